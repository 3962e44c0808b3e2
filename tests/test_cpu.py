"""CPU knobs: what the worker is told, what is refused before work, and what is really in effect in
the worker (read back there, never copied from the config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src import cpu, hw
from src.config import ConfigError, validate
from tests.conftest import TINY, run_cli
from tests.system import require

ALL_FLAGS = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16"}


def knobs(**over: object) -> OmegaConf:
    base = OmegaConf.load(Path(__file__).parents[1] / "conf/cpu/default.yaml")
    return OmegaConf.merge(base, over)


@pytest.mark.parametrize(("spec", "cores"), [
    (None, None), (3, [3]), ("0-2", [0, 1, 2]), ("0,2,4-5", [0, 2, 4, 5]), ([1, 0, 1], [0, 1]),
])
def test_core_specs(spec, cores):
    assert cpu.parse_cores(spec) == cores
    if cores:
        assert cpu.parse_cores(hw.format_cores(cores)) == cores


@pytest.mark.parametrize("spec", ["a-b", "3-1", "1;2"])
def test_bad_core_specs_are_named(spec):
    with pytest.raises(ValueError, match="cpu.cores"):
        cpu.parse_cores(spec)


def test_env_sets_every_library_for_an_isa_cap_and_preloads_the_allocator(monkeypatch):
    monkeypatch.setattr(cpu, "find_allocator", lambda name: f"/lib/lib{name}.so" if name != "system" else None)
    env = cpu.env(knobs(isa="avx2", allocator="jemalloc", omp_proc_bind="close", omp_places="cores"), threads=3)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["PARETUNE_THREADS"] == "3"
    assert (env["ONEDNN_MAX_CPU_ISA"], env["MKL_ENABLE_INSTRUCTIONS"], env["ATEN_CPU_CAPABILITY"]) == (
        "AVX2", "AVX2", "avx2")
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so" and env["OMP_PROC_BIND"] == "close"
    plain = cpu.env(knobs(allocator="system"), threads=2)
    assert not {"LD_PRELOAD", "ONEDNN_MAX_CPU_ISA", "OMP_PROC_BIND", "KMP_AFFINITY"} & set(plain)


def test_auto_allocator_preloads_tcmalloc_where_installed_and_falls_back_to_system_malloc(monkeypatch):
    """cpu.allocator=auto (the default): tcmalloc (measured faster, bench.ablate_cpu) where its library is
    found, told not to print a stack per allocation over 1 GB; else the system's malloc, and no error."""
    from src import hw

    assert knobs().allocator == "auto"
    monkeypatch.setattr(hw, "_LIB_DIRS", ("/lib",))
    monkeypatch.setattr(hw.Path, "is_file", lambda self: str(self) == "/lib/libtcmalloc.so.4")
    env = cpu.env(knobs(), threads=2)
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc.so.4" and int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2**40
    monkeypatch.setattr(hw.Path, "is_file", lambda self: False)  # not installed
    errors: list[str] = []
    cpu.check(knobs(), errors, flags=ALL_FLAGS, usable={0, 1})
    assert errors == [] and "LD_PRELOAD" not in cpu.env(knobs(), threads=2)
    cpu.check(knobs(allocator="tcmalloc"), errors, flags=ALL_FLAGS, usable={0, 1})
    assert "libgoogle-perftools4" in errors[0]  # asked for by name, it must be there


@pytest.mark.parametrize(("over", "fragment"), [
    ({"threads": 3}, "cpu.threads: 3 threads on 2 usable cores"),
    ({"threads": 2, "cores": "1"}, "cpu.threads: 2 threads on 1 usable cores"),
    ({"cores": "5"}, "cpu.cores: [5] not among the cores"),
    ({"cores": "x"}, "cpu.cores: cannot read"),
    ({"isa": "avx512_core_amx"}, "cpu.isa: avx512_core_amx needs CPU flags ['amx_tile', 'amx_bf16']"),
])
def test_what_the_machine_cannot_do_is_refused(over, fragment):
    errors: list[str] = []
    cpu.check(knobs(**over), errors, flags=ALL_FLAGS - {"amx_tile", "amx_bf16"}, usable={0, 1})
    assert any(fragment in e for e in errors), errors


def test_force_allows_oversubscription_and_a_missing_allocator_names_its_package(monkeypatch):
    errors: list[str] = []
    cpu.check(knobs(threads=8, force=True), errors, flags=ALL_FLAGS, usable={0, 1})
    assert errors == []
    monkeypatch.setattr(cpu, "find_allocator", lambda name: None)
    cpu.check(knobs(allocator="tcmalloc"), errors, flags=ALL_FLAGS, usable={0, 1})
    assert errors and "libgoogle-perftools4" in errors[0] and "cpu.allocator=system" in errors[0]


def test_bf16_without_native_units_is_flagged():
    assert cpu.warnings_for(knobs(dtype="bf16"), flags={"avx2", "avx512f"}) == [cpu.BF16_EMULATED_NOTE]
    assert cpu.warnings_for(knobs(dtype="bf16"), flags=ALL_FLAGS) == []
    assert "pinning" in cpu.warnings_for(knobs(omp_proc_bind="close"), flags=ALL_FLAGS)[0]


def test_config_errors_name_the_cpu_keys(cfg_factory):
    with pytest.raises(ConfigError) as err:
        validate(cfg_factory("cpu.omp_proc_bind=sideways", f"cpu.threads={len(os.sched_getaffinity(0)) + 1}"))
    assert "cpu.omp_proc_bind" in str(err.value) and "cpu.threads" in str(err.value)


def test_hw_reports_flags_allocators_and_a_profile():
    out = json.loads(subprocess.run([sys.executable, "-m", "src.hw"], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["usable_cores"] >= 1 and out["numa_nodes"] >= 1 and out["model"]
    assert {"amx_tile", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx512f", "avx2"} <= set(out["flags"])
    assert set(out["allocators"]) == {"system", "tcmalloc", "jemalloc"}
    assert out["suggested_cpu_profile"]["threads"] == out["usable_cores"]


def _require_allocators() -> None:
    for name, package in cpu.ALLOCATOR_PACKAGES.items():
        if cpu.find_allocator(name) is None:
            require(name, f"Debian package {package}; `make setup` installs it as root")


def _trial(tmp_path: Path, data_root: Path, cache_dir: Path, *args: str) -> dict:
    proc = run_cli([*TINY, f"data.root={data_root}", f"paths.cache_dir={cache_dir}", "logger=none",
                    f"hydra.run.dir={tmp_path / 'run'}", *args], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "completed", record.get("error")
    return record


def test_knobs_are_in_effect_in_the_worker(tmp_path, data_root, cache_dir):
    _require_allocators()
    record = _trial(tmp_path, data_root, cache_dir, "cpu.allocator=tcmalloc", "cpu.threads=1", "cpu.cores=0",
                    "cpu.interop_threads=2", "cpu.omp_proc_bind=close")
    c = record["cpu"]
    assert c["allocator"] == "tcmalloc"           # from /proc/self/maps
    assert c["torch_threads"] == 1 and c["torch_interop_threads"] == 2
    assert c["affinity"] == "0"                   # os.sched_getaffinity inside the worker
    assert c["env"]["OMP_PROC_BIND"] == "close"
    assert c["autocast_in_training"] is None and any("pinning" in w for w in c["warnings"])


def isa_cap_below_the_best(flags: set[str]) -> tuple[str, str | None]:
    """This CPU's best cpu.isa level, and the level to cap it to: the lowest one, strictly below the
    best (None when the best is already the lowest). The lowest, because below every AVX-512 level it
    changes what all three libraries report (ATen avx512 -> avx2, not only oneDNN's name)."""
    have = [name for name, level in cpu.ISA_LEVELS.items() if all(f in flags for f in level["flags"])]
    if not have:
        return "none", None
    return have[-1], (have[0] if len(have) > 1 else None)


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx2", "fma"}, ("avx2", None)),
    ({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}, ("avx512_core", "avx2")),
    (ALL_FLAGS, ("avx512_core_amx", "avx2")),
])
def test_the_isa_cap_checked_in_the_worker_is_below_the_cpus_best_level(flags, expected):
    assert isa_cap_below_the_best(flags) == expected


def test_an_isa_cap_below_the_cpus_best_level_is_in_effect_in_the_worker(tmp_path, data_root, cache_dir):
    """Capped strictly below what this CPU can do, each library reports less than it does uncapped
    (in this process): a cap at the CPU's own best level would prove nothing."""
    best, cap = isa_cap_below_the_best(hw.cpu_flags())
    if cap is None:
        pytest.skip(f"this CPU's best cpu.isa level is {best}, the lowest there is: no lower level to cap to")
    level = cpu.ISA_LEVELS[cap]
    uncapped_aten, uncapped_onednn = hw_capability(), cpu.onednn_isa()
    c = _trial(tmp_path, data_root, cache_dir, f"cpu.isa={cap}")["cpu"]
    assert c["aten_cpu_capability"] == level["aten"].upper() != uncapped_aten  # ATen's dispatch
    assert c["onednn_isa"] != uncapped_onednn, c["onednn_isa"]                  # oneDNN's own report
    assert c["env"]["MKL_ENABLE_INSTRUCTIONS"] == level["mkl"]


def test_defaults_and_bf16_and_jemalloc_in_the_worker(tmp_path, data_root, cache_dir):
    _require_allocators()
    record = _trial(tmp_path, data_root, cache_dir, "cpu.allocator=jemalloc", "cpu.dtype=bf16")
    fused = record["run"]["fused_projections"]  # by default: q/k/v, gate/up, and they ran fused under autocast
    assert fused["groups"] > 0 and fused["fell_back"] == 0
    c = record["cpu"]
    assert c["allocator"] == "jemalloc" and c["dtype"] == "bf16"
    assert c["autocast_in_training"] == "bfloat16"
    assert record["run"]["eval_decoder"] == "hf"  # the static cache cannot hold autocast's mixed dtypes
    assert c["torch_threads"] == len(os.sched_getaffinity(0)) and "LD_PRELOAD" in c["env"]
    assert c["aten_cpu_capability"] == hw_capability()
    flags = hw.cpu_flags()
    assert (cpu.BF16_EMULATED_NOTE in c["warnings"]) == (not {"avx512_bf16", "amx_bf16"} & flags)


def hw_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()
