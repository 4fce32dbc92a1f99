"""scripts/check_tokenizers_llama_cpp.py where llama-cpp-python is missing (it is never a
dependency): one sentence saying what to install, not a traceback half-way through."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_tokenizers_llama_cpp.py"

# run the script as `python3 SCRIPT` does, with llama_cpp unimportable whether or not it
# is installed here
WITHOUT_LLAMA_CPP = (
    "import runpy, sys; sys.modules['llama_cpp'] = None; sys.argv = [sys.argv[1]]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_without_llama_cpp_one_sentence_names_the_package() -> None:
    proc = subprocess.run([sys.executable, "-c", WITHOUT_LLAMA_CPP, str(SCRIPT)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == (
        "check_tokenizers_llama_cpp: needs llama-cpp-python (pip install llama-cpp-python)\n"
    )
    assert proc.stdout == ""


def test_help_describes_the_check() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Hold bitserve's tokenizers to llama.cpp's" in proc.stdout
