"""First contact: building without torch visible (pip's default build isolation) is one line
saying what to do, not a traceback from setup.py."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_setup_without_torch_says_to_install_it_and_use_no_build_isolation():
    hide_torch = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; " \
                 "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))"
    result = subprocess.run([sys.executable, "-c", hide_torch], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "install torch first" in lines[0] and "--no-build-isolation" in lines[0], lines
