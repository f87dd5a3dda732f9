"""`trace`: follow a tiny program of assignments to the value it prints.

    question: a = 3 ; b = a + 2 ; a = b - 1 ; print ( a )
    response: a is 3 . b is 3 + 2 = 5 . a is 5 - 1 = 4 . so it prints 4 . the answer is 4 .

Two to four statements over single-letter variables, constants 1..9, every value in 0..20. Each
line of a trace copies a name's current value from earlier in the text, so the family has the
long, exact token-to-token dependencies of code.

As in `arith`, one program has many valid traces (see `draw_response`): several phrasings per
line, optional connectives, an optional opening and closing sentence, statements that do not
affect the printed variable traced or skipped, and statements that do not depend on one another
traced in any order that respects the program's data dependencies (read after write, write after
read, write after write), so the value a trace reads for a name is always the right one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from unmask.errors import UnmaskError
from unmask.tasks.base import Problem
from unmask.tasks.generated import (
    RESPONSE_SLACK,
    GeneratedTask,
    count_tokens,
    join_words,
    problem_id,
    template_words,
)

MAX_QUESTION_TOKENS = 26  # four statements and the print, every constant one digit
MAX_RESPONSE_TOKENS = 48  # every response drawn by sample_response (traces run longer than arith)

MAX_VALUE = 20
MAX_CONSTANT = 9
VARIABLES = ("a", "b", "c", "d", "x", "y")
OPS = ("+", "-")

# -- question -----------------------------------------------------------------------------------
SEPARATOR = ";"
PRINT = "print ( {v} )"

# -- response: {v} target, {u} {op} {w} as written, {x} {op} {y} the values, {z} the result ------
ASSIGN_CONSTANT = ("{v} = {n} .", "{v} is {n} .", "set {v} to {n} .")
ASSIGN_BINARY = (
    "{v} = {x} {op} {y} = {z} .",
    "{v} is {x} {op} {y} = {z} .",
    "{v} = {u} {op} {w} = {x} {op} {y} = {z} .",
    "set {v} to {x} {op} {y} = {z} .",
    "{v} becomes {z} ( {x} {op} {y} ) .",
)
NAMED_BINARY = ASSIGN_BINARY[2]  # the phrasing that copies the statement before its values
OPENING = ("", "we print {p} .", "we need {p} .")
FIRST_CONNECTIVES = ("", "first")
LATER_CONNECTIVES = ("", "then", "next", "now")
CLOSING = ("", "so it prints {z} .", "so {p} is {z} .")
NAMED_CLOSING = CLOSING[2]  # names the printed variable before its value
CLOSINGS = ("any", "named")  # the `closing` option's values
ANSWER = "the answer is {z} ."


@dataclass(frozen=True)
class Statement:
    """`target = left` or `target = left op right`; operands are variable names or digit strings."""

    target: str
    left: str
    op: str | None = None
    right: str | None = None

    @property
    def reads(self) -> set[str]:
        return {name for name in (self.left, self.right) if name is not None and not name.isdigit()}

    def text(self) -> str:
        if self.op is None:
            return f"{self.target} = {self.left}"
        return f"{self.target} = {self.left} {self.op} {self.right}"


def parse_program(question: str) -> tuple[list[Statement], str]:
    """The statements and the printed variable of a trace question."""
    *lines, last = [line.split() for line in question.split(SEPARATOR)]
    if len(last) != 4 or last[0] != "print" or last[1] != "(" or last[3] != ")":
        raise UnmaskError(f"trace question {question!r} does not end with 'print ( v )'; pass a question from the trace task")
    statements = []
    for words in lines:
        if len(words) == 3 and words[1] == "=":
            statements.append(Statement(words[0], words[2]))
        elif len(words) == 5 and words[1] == "=" and words[3] in OPS:
            statements.append(Statement(words[0], words[2], words[3], words[4]))
        else:
            raise UnmaskError(f"trace statement {' '.join(words)!r} is not 'v = n' or 'v = u op w'; pass a question from the trace task")
    return statements, last[2]


@dataclass(frozen=True)
class _Line:
    """One executed statement: the operand values it read and the value it wrote."""

    index: int
    statement: Statement
    x: int
    y: int | None
    z: int


def evaluate(statement: Statement, env: dict[str, int]) -> tuple[int, int | None, int]:
    """The operand values a statement reads in `env` and the value it writes."""

    def value(operand: str) -> int:
        return int(operand) if operand.isdigit() else env[operand]

    x = value(statement.left)
    if statement.op is None:
        return x, None, x
    y = value(statement.right)
    return x, y, x + y if statement.op == "+" else x - y


def run_program(statements: list[Statement]) -> tuple[list[_Line], dict[str, int]]:
    """Execute the statements; raises KeyError on a variable read before it is set."""
    env: dict[str, int] = {}
    lines = []
    for index, statement in enumerate(statements):
        x, y, z = evaluate(statement, env)
        env[statement.target] = z
        lines.append(_Line(index, statement, x, y, z))
    return lines, env


def relevant_lines(statements: list[Statement], printed: str) -> set[int]:
    """Indices of the statements the printed value depends on (a backward slice)."""
    needed, relevant = {printed}, set()
    for index in range(len(statements) - 1, -1, -1):
        statement = statements[index]
        if statement.target in needed:
            relevant.add(index)
            needed.discard(statement.target)
            needed |= statement.reads
    return relevant


def last_assignment(statements: list[Statement], printed: str) -> int:
    """Index of the last statement that assigns the printed variable: later ones cannot change it."""
    return max(index for index, statement in enumerate(statements) if statement.target == printed)


def must_precede(first: Statement, second: Statement) -> bool:
    """Whether `first` (earlier in the program) must be traced before `second`."""
    return (
        first.target in second.reads  # read after write
        or second.target in first.reads  # write after read
        or first.target == second.target  # write after write
    )


@dataclass
class TraceTask(GeneratedTask):
    """Generated program traces (see the module docstring).

    Options: pool sizes, generator seed, and five that shape only the worked answers drawn for
    training (`sample_response`), never the problems, the splits or the scoring:
    - `skip`: the chance that a statement which cannot change the printed value is left out of a
      trace (default 0.5; 0 traces every statement);
    - `free_order`: whether statements that do not depend on one another may be traced out of
      program order (default true; false traces them in program order);
    - `named`: an extra chance that a line `v = u op w` is traced in the phrasing that copies the
      statement before its values, `v = u op w = x op y = z` (default 0: the five phrasings are
      equally likely, so `named=0.75` makes that one 80% of lines). Copying the statement and then
      each operand's value is one lookup per token; the other phrasings write the values alone, so
      the model must find the statement and the operand's last value in one step;
    - `closing`: `any` (default) draws the closing sentence among none, `so it prints z .` and
      `so p is z .`; `named` always writes `so p is z .`, so the answer follows the printed
      variable's name and its value is the same lookup of a name's last value as an operand's.
      Without it, a model that traces right still tends to answer with the last value it computed
      when the program prints an earlier variable (see docs/builtin.md);
    - `stop_early`: whether a trace always stops at the printed variable's last assignment,
      leaving out the statements after it, which cannot change the printed value (default false:
      they are skipped like any other such statement, with chance `skip`). With `skip=0` a trace
      is then statements 1..k of the program, k the printed variable's last assignment, so the
      value a trace ends on is always the answer, and the model's only new decision is when to
      stop: whether a later statement assigns the printed variable again.
    At the defaults the family has all the variety the module docstring lists. `trace:skip=0,
    free_order=false` keeps the phrasings, connectives, opening and closing but fixes which lines a
    trace has and their order, so line k of a trace is statement k of the program. The built-in
    model's last runs narrowed it step by step (see docs/builtin.md): `named=0.75`,
    then `closing=named,stop_early=true`.
    """

    name = "trace"
    max_response_tokens = MAX_RESPONSE_TOKENS

    skip: float = 0.5
    free_order: bool = True
    named: float = 0.0
    closing: str = "any"
    stop_early: bool = False

    def __post_init__(self):
        super().__post_init__()
        for name in ("skip", "named"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise UnmaskError(f"trace option {name} must be a probability in [0, 1], got {value!r}", field=name)
        for name in ("free_order", "stop_early"):
            if not isinstance(getattr(self, name), bool):
                raise UnmaskError(f"trace option {name} must be true or false, got {getattr(self, name)!r}", field=name)
        if self.closing not in CLOSINGS:
            raise UnmaskError(f"trace option closing must be one of {', '.join(CLOSINGS)}, got {self.closing!r}", field="closing")

    # -- problems -------------------------------------------------------------------------------
    def generate_problem(self, rng: random.Random) -> Problem | None:
        env: dict[str, int] = {}  # in assignment order, so draws from it are reproducible
        statements = []
        for _ in range(rng.randint(2, 4)):
            defined = list(env)
            fresh = [v for v in VARIABLES if v not in env]
            target = rng.choice(fresh) if (not env or rng.random() < 0.65) else rng.choice(defined)
            kind = "constant" if not env else rng.choices(("constant", "var_const", "var_var"), weights=(2, 5, 3))[0]
            statement = None
            if kind == "var_var":
                statement = self._var_var(rng, target, rng.choice(defined), rng.choice(defined), env)
            if kind == "var_const" or (kind == "var_var" and statement is None):
                statement = self._var_const(rng, target, rng.choice(defined), env)
            if kind == "constant":
                statement = Statement(target, str(rng.randint(1, MAX_CONSTANT)))
            env[target] = evaluate(statement, env)[2]
            statements.append(statement)
        printed = statements[-1].target if rng.random() < 0.7 else rng.choice(sorted(env))
        question = f" {SEPARATOR} ".join([s.text() for s in statements] + [PRINT.format(v=printed)])
        if count_tokens(question) > MAX_QUESTION_TOKENS:
            return None
        problem = Problem(problem_id("trace", question), question, str(env[printed]), {"statements": len(statements)})
        if count_tokens(self._shortest(statements, printed)) > MAX_RESPONSE_TOKENS - RESPONSE_SLACK:
            return None
        return problem

    @staticmethod
    def _var_const(rng: random.Random, target: str, left: str, env: dict[str, int]) -> Statement:
        """`target = left op n`, with op and n drawn so that the result stays in 0..MAX_VALUE."""
        x = env[left]
        ops = [op for op, ok in (("+", x < MAX_VALUE), ("-", x > 0)) if ok]
        op = rng.choice(ops)
        top = min(MAX_CONSTANT, MAX_VALUE - x if op == "+" else x)
        return Statement(target, left, op, str(rng.randint(1, top)))

    @staticmethod
    def _var_var(rng: random.Random, target: str, left: str, right: str, env: dict[str, int]) -> Statement | None:
        """`target = left op right` if some op keeps the result in range, else None."""
        x, y = env[left], env[right]
        # "u - u" is always 0: too easy and, left in, the most common answer by far
        ops = [op for op, ok in (("+", x + y <= MAX_VALUE), ("-", x >= y and left != right)) if ok]
        return Statement(target, left, rng.choice(ops), right) if ops else None

    def hardness(self, problem: Problem) -> float:
        """Statements minus one (1..3), doubled when the printed variable is not the last one assigned.

        Both are where the built-in model fails: its accuracy falls with program length, and most
        of all when the answer is an earlier variable's value (see docs/builtin.md).
        """
        statements, printed = parse_program(problem.question)
        return (len(statements) - 1) * (2.0 if printed != statements[-1].target else 1.0)

    # -- responses ------------------------------------------------------------------------------
    def draw_response(self, problem: Problem, rng: random.Random) -> str:
        statements, printed = parse_program(problem.question)
        lines, env = run_program(statements)
        relevant = relevant_lines(statements, printed)
        # statements that cannot change the printed value are skipped, each with chance `skip`
        # (always, with `stop_early`, those after the printed variable's last assignment)
        end = self._last_traced(statements, printed)
        included = [
            line for line in lines
            if line.index <= end and (line.index in relevant or rng.random() < 1.0 - self.skip)
        ]
        parts = [rng.choice(OPENING).format(p=printed)]
        pending = list(included)
        while pending:
            ready = [
                line for line in pending
                if not any(other.index < line.index and must_precede(other.statement, line.statement) for other in pending)
            ] if self.free_order else pending[:1]
            line = rng.choice(ready)
            pending.remove(line)
            connective = rng.choice(LATER_CONNECTIVES if len(pending) < len(included) - 1 else FIRST_CONNECTIVES)
            named = self.named > 0 and line.statement.op is not None and rng.random() < self.named
            choose = (lambda _: NAMED_BINARY) if named else rng.choice
            parts.append(join_words(connective, self._line_text(choose, line)))
        z = env[printed]
        closing = NAMED_CLOSING if self.closing == "named" else rng.choice(CLOSING)
        parts.append(closing.format(z=z, p=printed))
        parts.append(ANSWER.format(z=z))
        return join_words(*parts)

    def shortest_response(self, problem: Problem) -> str:
        return self._shortest(*parse_program(problem.question))

    def fallback_response(self, problem: Problem) -> str:
        """The plain form that keeps what these options fix: every statement when `skip=0` (up to
        the printed variable's last assignment with `stop_early`), the named closing when
        `closing=named`; the shortest form if that would not fit.

        Four-statement programs written with the copying phrasing and the named closing often run
        past the length bound, and falling back to the shortest form (relevant lines only, no
        closing) would teach those programs, the hardest, without the step the options add. At the
        defaults this is the shortest form, so default draws are unchanged.
        """
        statements, printed = parse_program(problem.question)
        traced = statements[: self._last_traced(statements, printed) + 1]
        response = self._plain(traced, printed, every=self.skip == 0, closing=self.closing == "named")
        return response if count_tokens(response) <= self.max_response_tokens else self._shortest(statements, printed)

    def _last_traced(self, statements: list[Statement], printed: str) -> int:
        """Index of the last statement a trace may include: all of them, or with `stop_early` the
        printed variable's last assignment."""
        return last_assignment(statements, printed) if self.stop_early else len(statements) - 1

    def _shortest(self, statements: list[Statement], printed: str) -> str:
        return self._plain(statements, printed, every=False, closing=False)

    def _plain(self, statements: list[Statement], printed: str, *, every: bool, closing: bool) -> str:
        """Lines in program order in their first phrasing (all, or only the relevant ones), an
        optional named closing, then the answer."""
        lines, env = run_program(statements)
        relevant = relevant_lines(statements, printed)
        first = lambda templates: templates[0]  # noqa: E731
        parts = [self._line_text(first, line) for line in lines if every or line.index in relevant]
        if closing:
            parts.append(NAMED_CLOSING.format(z=env[printed], p=printed))
        parts.append(ANSWER.format(z=env[printed]))
        return join_words(*parts)

    @staticmethod
    def _line_text(choose, line: _Line) -> str:
        s = line.statement
        if s.op is None:
            return choose(ASSIGN_CONSTANT).format(v=s.target, n=line.z)
        return choose(ASSIGN_BINARY).format(v=s.target, u=s.left, op=s.op, w=s.right, x=line.x, y=line.y, z=line.z)

    # -- vocabulary -----------------------------------------------------------------------------
    @classmethod
    def vocabulary(cls) -> set[str]:
        words = template_words(
            SEPARATOR, PRINT, *ASSIGN_CONSTANT, *ASSIGN_BINARY, *OPENING,
            *FIRST_CONNECTIVES, *LATER_CONNECTIVES, *CLOSING, ANSWER, *OPS,
        )
        return words | set(VARIABLES)
