"""The command line as a user meets it: every user error is one line on stderr (no traceback), baking
never succeeds silently, and ``verify`` finds what is wrong with a baked cache."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flash_kda import __main__ as cli_main
from flash_kda.jit import all_specs
from flash_kda.jit.arch import ALL_TARGETS
from flash_kda.jit import compiler as compiler_mod

from cache_helpers import IS_ROOT, cli, env, needs_root, one_line, python, read_only_view

N_SPECS = len(list(all_specs(ALL_TARGETS)))  # baked_cache holds every target's


# ------------------------------------------------------------------ 7. baking into a directory that cannot be written


def test_precompile_into_a_read_only_directory_fails_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with read_only_view(tmp_path / "empty", tmp_path / "ro") as ro:
        res = cli("precompile", "--cache-dir", str(ro), "--arch", "sm_90a")
    assert res.returncode == 1, res.stdout + res.stderr
    line = one_line(res.stderr)
    assert line.startswith(f"flash_kda: cannot write the cache directory {ro}: ")
    assert ("Read-only file system" if IS_ROOT else "Permission denied") in line
    assert "compiled" not in res.stdout  # failed before compiling anything


def test_precompile_into_an_untrusted_directory_fails_in_one_line(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    res = cli("precompile", "--cache-dir", str(shared))
    assert res.returncode == 1
    assert "writable by group or others (mode 0777)" in one_line(res.stderr)


# ------------------------------------------------------------------ 9. a full disk


@needs_root
def test_a_full_disk_stops_precompile_at_the_first_failed_write(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k,mode=755", "tmpfs", str(small)], check=True)
    try:
        start = time.monotonic()
        res = cli("precompile", "--cache-dir", str(small), "--jobs", "2")
        elapsed = time.monotonic() - start
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert res.returncode == 1, res.stdout + res.stderr
    line = one_line(res.stderr)
    assert line.startswith(f"flash_kda: cannot write {small}/") and "No space left on device [errno 28]" in line
    compiled = res.stdout.count(" compiled ")
    assert compiled < 6 and elapsed < 120, (compiled, elapsed, res.stdout)  # stopped, did not go on for 54


# ------------------------------------------------------------------ 10. verify


@pytest.fixture
def baked_copy(baked_cache, tmp_path) -> Path:
    copy = tmp_path / "image"
    shutil.copytree(baked_cache, copy)
    return copy


def test_verify_passes_a_complete_cache_and_precompile_under_disable_jit_is_verify(baked_copy):
    res = cli("verify", "--arch", "all", "--cache-dir", str(baked_copy))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith(f"{N_SPECS}/{N_SPECS} specialisations present and intact; 0 problems")
    res = cli("precompile", "--arch", "all", "--cache-dir", str(baked_copy), FLASH_KDA_DISABLE_JIT="1")
    assert res.returncode == 0 and "nothing is compiled" in res.stdout and "0 problems" in res.stdout


def test_verify_reports_each_problem_in_one_line(baked_copy):
    entries = sorted(baked_copy.glob("kda_*/*.cubin"))
    missing, corrupt, swapped_a, swapped_b, loose = entries[0], entries[1], entries[2], entries[3], entries[4]
    missing.unlink()
    missing.with_suffix(".json").unlink()
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    shutil.copy(swapped_b, swapped_a)  # another kernel's cubin and metadata over an entry
    shutil.copy(swapped_b.with_suffix(".json"), swapped_a.with_suffix(".json"))
    loose.chmod(0o666)
    res = cli("verify", "--arch", "all", "--cache-dir", str(baked_copy))
    assert res.returncode == 1
    problems = [line for line in res.stdout.splitlines() if line.startswith("PROBLEM ")]
    assert len(problems) == 4, res.stdout
    text = "\n".join(problems)
    assert f"{missing}: missing" in text
    assert f"{corrupt}: corrupt (size or checksum mismatch)" in text
    assert f"{swapped_a}: holds another kernel" in text
    assert f"{loose}: {loose} is writable by group or others (mode 0666)" in text
    assert res.stdout.strip().endswith("; 4 problems")
    res = cli("precompile", "--arch", "all", "--cache-dir", str(baked_copy), FLASH_KDA_DISABLE_JIT="1")  # compiles nothing
    assert res.returncode == 1 and "compiled" not in res.stdout.replace("nothing is compiled", "")
    assert "PROBLEM" in res.stdout


def test_verify_counts_an_entry_in_an_earlier_metadata_layout_as_another_versions(baked_copy):
    """An entry whose metadata an earlier flash_kda wrote (a chunked spec with its former varlen field)
    is never loaded by this version: verify counts it among other versions' entries, not as a problem."""
    entry = sorted(baked_copy.glob("kda_fwd_*/*.cubin"))[0]
    meta = json.loads(entry.with_suffix(".json").read_text())
    meta["spec"]["varlen"] = True
    earlier = baked_copy / (entry.parent.name + "_varlen")
    earlier.mkdir()
    shutil.copy(entry, earlier / entry.name)
    (earlier / entry.name).with_suffix(".json").write_text(json.dumps(meta))
    res = cli("verify", "--arch", "all", "--cache-dir", str(baked_copy))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith(f"{N_SPECS}/{N_SPECS} specialisations present and intact; "
                                       "1 entries of other versions or compilers; 0 problems"), res.stdout


def test_verify_counts_an_entry_named_as_another_version_names_specs_as_another_versions(baked_copy):
    """An earlier flash_kda named decode specs `..._in-fp32_out-fp32_varlen_...`: an entry with its own key in a
    directory this version would name otherwise is never loaded; verify counts it, not as one that holds
    another kernel (found by the README walkthrough on a real ~/.cache)."""
    entry = sorted(baked_copy.glob("kda_decode_*/*.cubin"))[0]
    earlier = baked_copy / (entry.parent.name + "_earlier_name")
    earlier.mkdir()
    shutil.copy(entry, earlier / entry.name)
    shutil.copy(entry.with_suffix(".json"), earlier / entry.with_suffix(".json").name)
    res = cli("verify", "--arch", "all", "--cache-dir", str(baked_copy))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith(f"{N_SPECS}/{N_SPECS} specialisations present and intact; "
                                       "1 entries of other versions or compilers; 0 problems"), res.stdout


def test_verify_flags_a_bake_that_other_users_cannot_read(baked_copy):
    baked_copy.chmod(0o755)  # an image's cache directory, meant for every user
    entry = next(baked_copy.glob("kda_*/*.cubin"))
    entry.chmod(0o600)  # what mkstemp leaves when publishing forgets to set the mode
    res = cli("verify", "--cache-dir", str(baked_copy))
    assert res.returncode == 1 and "not readable by other users" in res.stdout


# ------------------------------------------------------------------ 12. a failed compile inside precompile

BROKEN_TEMPLATE = textwrap.dedent("""
    import sys
    from flash_kda.jit.spec import KernelSpec
    KernelSpec.source = lambda self: 'this is not CUDA; // ' + self.name  # also in the spawned workers
    if __name__ == "__main__":
        from flash_kda.__main__ import main
        sys.exit(main(["precompile", "--cache-dir", sys.argv[1], "--jobs", "2"]))
""")


def test_a_failed_compile_inside_precompile_names_the_spec_and_the_first_errors(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text(BROKEN_TEMPLATE)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "cache")], capture_output=True, text=True,
                         env=env(), timeout=600)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("flash_kda: nvrtc failed to compile kda_fwd_") and "error" in lines[0], res.stderr
    assert 1 <= len(lines) <= 5 and all(line.startswith("  ") for line in lines[1:])
    assert "Traceback" not in res.stderr and "BrokenProcessPool" not in res.stderr


# ------------------------------------------------------------------ 13. user errors: one line each


@pytest.mark.parametrize("args,message", [
    (["precompile", "--arch", "sm_70"], "flash_kda: unsupported arch 'sm_70'; supported: sm_80, sm_86, sm_89, sm_90a,"),
    (["precompile", "--arch", "sm_90"], "flash_kda: unsupported arch 'sm_90' (did you mean sm_90a?"),
    (["verify", "--arch", "compute_90a"], "(give the real target, e.g. sm_90a, not the virtual one)"),
    (["precompile", "--jobs", "0"], "flash_kda: error: argument --jobs: must be an integer >= 1, got '0'"),
    (["precompile", "--jobs", "-1"], "flash_kda: error: argument --jobs: must be an integer >= 1, got '-1'"),
    (["precompile", "--compiler", "clang"], "flash_kda: error: argument --compiler: invalid choice: 'clang'"),
])
def test_bad_arguments_print_one_line(args, message, tmp_path):
    res = cli(*args, "--cache-dir", str(tmp_path))
    assert res.returncode in (1, 2) and message in one_line(res.stderr), res.stderr


def test_a_bad_compiler_environment_variable_is_one_line(tmp_path):
    res = cli("precompile", "--cache-dir", str(tmp_path), FLASH_KDA_COMPILER="clang")
    assert res.returncode == 1
    assert one_line(res.stderr) == "flash_kda: FLASH_KDA_COMPILER must be one of nvrtc, nvcc, got 'clang'"


def test_missing_nvcc_names_the_option_that_chose_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc on PATH
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(compiler_mod, "NVCC_DIRS", (str(tmp_path / "cuda" / "bin"),))
    assert cli_main.main(["precompile", "--compiler", "nvcc", "--cache-dir", str(tmp_path)]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("flash_kda: nvcc not found (selected by --compiler nvcc); looked on PATH, ")
    assert "FLASH_KDA_COMPILER" not in line
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "toolkit"))
    monkeypatch.setenv("FLASH_KDA_COMPILER", "nvcc")
    assert cli_main.main(["verify", "--cache-dir", str(tmp_path)]) == 1
    line = one_line(capsys.readouterr().err)
    assert "(selected by FLASH_KDA_COMPILER=nvcc); looked on " + str(tmp_path / "toolkit" / "bin") in line


def test_missing_nvrtc_names_the_package_to_install(tmp_path, monkeypatch, capsys):
    from cuda.bindings import nvrtc
    from cuda.pathfinder import DynamicLibNotFoundError

    def missing():
        raise DynamicLibNotFoundError('Failure finding "libnvrtc.so.13": No such file')
    monkeypatch.setattr(nvrtc, "nvrtcVersion", missing)
    assert cli_main.main(["precompile", "--cache-dir", str(tmp_path)]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("flash_kda: cannot load NVRTC, the default compiler (DynamicLibNotFoundError: ")
    assert "pip install 'nvidia-cuda-nvrtc>=13,<14'" in line


# ------------------------------------------------------------------ 14. a bad FLASH_KDA_LOG_LEVEL


@pytest.mark.parametrize("value", ["verbose", "loud", "-"])
def test_a_bad_log_level_warns_and_import_works(value):
    res = python("import flash_kda, logging; print(logging.getLogger('flash_kda').level)", FLASH_KDA_LOG_LEVEL=value)
    assert res.returncode == 0, res.stderr
    assert one_line(res.stderr) == (f"flash_kda: FLASH_KDA_LOG_LEVEL={value!r} is not a log level (use one of DEBUG, "
                                    "INFO, WARNING, ERROR, CRITICAL or a number); using WARNING")
    assert res.stdout.strip() == "30"


def test_a_good_log_level_is_applied():
    res = python("import flash_kda, logging; print(logging.getLogger('flash_kda').level)", FLASH_KDA_LOG_LEVEL="debug")
    assert res.returncode == 0 and res.stdout.strip() == "10" and res.stderr == ""
