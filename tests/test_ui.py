"""Progress outside a terminal: one line at the start and end of a stage, at most one per interval between."""

import subprocess
import sys
import textwrap


def _plain_lines(body: str) -> list[str]:
    """Run `body` in a real child process whose stderr is a pipe (not a terminal); its stderr lines."""
    code = "import time\nfrom kano.core import ui\n" + textwrap.dedent(body)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return [line for line in p.stderr.splitlines() if line.strip()]


def test_many_fast_steps_print_only_start_and_end():
    lines = _plain_lines("""
        advance, close = ui.progress_factory("scoring")(1000)
        for _ in range(1000):
            advance(1)
        close()
    """)
    assert lines[0] == "scoring: started, 1000 to do"
    assert lines[-1].startswith("scoring: 1000/1000 done in ")
    assert len(lines) == 2, lines


def test_slow_steps_print_at_most_one_line_per_interval():
    # 40 steps of >= 50 ms (>= 2 s) with a 0.5 s interval: start, at most elapsed / 0.5 lines in between, end
    lines = _plain_lines("""
        advance, close = ui.progress_factory("epoch 1/2", interval_s=0.5)(40)
        for _ in range(40):
            time.sleep(0.05)
            advance(1)
        close()
    """)
    middle = lines[1:-1]
    elapsed = float(lines[-1].split(" done in ")[1].split()[0])
    assert 2 <= len(middle) <= elapsed / 0.5, lines
    assert all(line.startswith("epoch 1/2: ") and "/40 (" in line for line in middle), lines
    assert lines[-1].startswith("epoch 1/2: 40/40 done in ")
