"""The generated families (arith, trace): splits, bounds, vocabulary, and varied worked answers."""

import random
import re
from collections import Counter

import pytest

from unmask.errors import UnmaskError
from unmask.tasks import Problem, count_tokens, get_task, split_of
from unmask.tasks import arith, generated, trace

FAMILIES = {"arith": arith, "trace": trace}
NUMBER = re.compile(r"^\d+$")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """(task, module, a few thousand problems across all three splits)."""
    task = get_task(request.param, train_size=2400, dev_size=300, test_size=300)
    problems = {split: task.problems(split) for split in task.splits}
    return task, FAMILIES[request.param], problems


def all_problems(problems):
    return [p for split in problems.values() for p in split]


def test_splits_are_disjoint_and_decided_by_the_question(family):
    task, _, problems = family
    questions = {split: {p.question for p in ps} for split, ps in problems.items()}
    assert sum(len(q) for q in questions.values()) == len(all_problems(problems)) >= 3000
    assert not questions["train"] & questions["dev"]
    assert not questions["train"] & questions["test"]
    assert not questions["dev"] & questions["test"]
    for split, ps in problems.items():
        assert all(split_of(p.question) == split for p in ps)
    ids = [p.id for p in all_problems(problems)]
    assert len(set(ids)) == len(ids)


def test_problems_are_deterministic_and_seed_only_picks_which(family, monkeypatch):
    task, _, problems = family
    pool = task.problems("test")
    assert [p.id for p in pool] == [p.id for p in problems["test"]]
    first = task.problems("test", limit=50, seed=0)
    assert [p.id for p in first] == [p.id for p in task.problems("test", limit=50, seed=0)]
    other = task.problems("test", limit=50, seed=1)
    assert {p.id for p in first} != {p.id for p in other}
    pool_ids = {p.id for p in pool}
    assert {p.id for p in first} <= pool_ids and {p.id for p in other} <= pool_ids
    # a fresh generator (no cache) reproduces the same problems
    monkeypatch.setattr(generated, "_STREAMS", {})
    again = get_task(task.name, test_size=300).problems("test")
    assert [p.id for p in again] == [p.id for p in pool]


def test_bigger_pools_extend_smaller_ones(family):
    task, _, problems = family
    small = get_task(task.name, test_size=100).problems("test")
    assert [p.id for p in small] == [p.id for p in problems["test"][:100]]


def test_limit_larger_than_the_pool_grows_it(family):
    task, _, _ = family
    assert len(get_task(task.name, test_size=100).problems("test", limit=150)) == 150


def test_question_bounds(family):
    task, module, problems = family
    lengths = [count_tokens(p.question) for p in all_problems(problems)]
    assert max(lengths) <= module.MAX_QUESTION_TOKENS
    assert max(lengths) >= module.MAX_QUESTION_TOKENS - 4  # the bound is tight, not a loose guess


def test_responses_are_correct_and_bounded(family):
    task, module, problems = family
    rng = random.Random(0)
    longest = 0
    for problem in all_problems(problems)[:1500]:
        for _ in range(3):
            response = task.sample_response(problem, rng)
            longest = max(longest, count_tokens(response))
            assert response.endswith(f"the answer is {problem.answer} ."), response
            assert task.extract(response) == problem.answer
            assert task.score(problem, response) == 1.0
    assert longest <= module.MAX_RESPONSE_TOKENS
    assert longest >= module.MAX_RESPONSE_TOKENS - 4


def test_every_arithmetic_step_in_a_response_is_right(family):
    task, _, problems = family
    rng = random.Random(1)
    equation = re.compile(r"(\d+(?: [+-] \d+)+) = (\d+)")  # also whole chains: 2 + 3 + 1 = 6
    bracket = re.compile(r"(\d+) \( (\d+) ([+-]) (\d+) \)")
    worded = re.compile(r"(\d+) (plus|minus) (\d+) is (\d+)")
    checked = 0
    for problem in all_problems(problems)[:600]:
        response = task.sample_response(problem, rng)
        for expression, z in equation.findall(response):
            assert eval(expression) == int(z), response  # digits and + - only, from our regex
            checked += 1
        for z, x, op, y in bracket.findall(response):
            assert int(x) + (int(y) if op == "+" else -int(y)) == int(z), response
        for x, word, y, z in worded.findall(response):
            assert int(x) + (int(y) if word == "plus" else -int(y)) == int(z), response
        for value in re.findall(r"\d+", response):
            assert 0 <= int(value) <= 20
    assert checked > 300


def test_text_stays_inside_the_vocabulary(family):
    task, _, problems = family
    vocabulary = task.vocabulary()
    assert all(not NUMBER.match(word) for word in vocabulary)
    assert len(vocabulary) < 300
    rng = random.Random(2)
    used = set()
    for problem in all_problems(problems)[:2000]:
        for text in (problem.question, task.sample_response(problem, rng)):
            used |= {word for word in text.split() if not NUMBER.match(word)}
    assert used <= vocabulary, used - vocabulary
    # and the declared vocabulary is actually used, not padded
    assert len(used) >= 0.9 * len(vocabulary)


def test_responses_vary_for_one_problem(family):
    task, _, problems = family
    rng = random.Random(3)
    for problem in problems["test"][:20]:
        samples = [task.sample_response(problem, rng) for _ in range(50)]
        assert len(set(samples)) >= 5, problem.question
        # the token at one position is not fixed by the prompt: a position-wise mixture
        tokens = [s.split() for s in samples]
        width = min(len(t) for t in tokens)
        varying = sum(len({t[i] for t in tokens}) > 1 for i in range(width))
        assert varying >= 0.5 * width, problem.question


def test_sampling_is_reproducible_with_the_rng(family):
    task, _, problems = family
    problem = problems["test"][0]
    a = [task.sample_response(problem, random.Random(7)) for _ in range(3)]
    b = [task.sample_response(problem, random.Random(7)) for _ in range(3)]
    assert a == b


def test_extract_reads_the_answer_phrase(family):
    task, _, _ = family
    assert task.extract("... so it is 4 . the answer is 12 .") == "12"
    assert task.extract("the answer is 1 2 .") == "12"  # a word-level tokenizer decodes digit by digit
    assert task.extract("the answer is 3 . the answer is 5 .") == "5"
    assert task.extract("5 + 3 = 8 .") is None
    problem = Problem("x", "q", "8")
    assert task.score(problem, "5 + 3 = 8 . the answer is 8 .") == 1.0
    assert task.score(problem, "5 + 3 = 8 . the answer is 9 .") == 0.0
    assert task.score(problem, "5 + 3 = 8 .") == 0.0


def test_messages_are_one_user_turn(family):
    task, _, problems = family
    problem = problems["test"][0]
    assert task.messages(problem) == [{"role": "user", "content": problem.question}]


def test_bad_split_and_sizes_are_user_errors(family):
    task, _, _ = family
    with pytest.raises(UnmaskError, match="no split 'validation'"):
        task.problems("validation")
    with pytest.raises(UnmaskError, match="test_size"):
        get_task(task.name, test_size=0)
    with pytest.raises(UnmaskError, match="limit"):
        task.problems("test", limit=-1)


# -- family specifics ---------------------------------------------------------------------------

def test_arith_has_all_three_shapes_and_up_to_three_operations():
    problems = get_task("arith").problems("test")
    kinds = Counter(p.meta["kind"] for p in problems)
    assert set(kinds) == {"chain", "total", "compare"}
    n_ops = Counter(sum(len(person["ops"]) for person in p.meta["people"]) + (p.meta["kind"] != "chain") for p in problems)
    assert set(n_ops) == {1, 2, 3}


def test_arith_total_is_worked_in_either_order():
    task = get_task("arith")
    problem = next(
        p for p in task.problems("test")
        if p.meta["kind"] == "total" and all(person["ops"] for person in p.meta["people"])
    )
    names = [person["name"] for person in problem.meta["people"]]
    rng = random.Random(4)
    firsts = Counter()
    for _ in range(100):
        response = task.sample_response(problem, rng)
        positions = {name: response.find(name) for name in names if name in response}
        if len(positions) == 2:
            firsts[min(positions, key=positions.get)] += 1
    assert len(firsts) == 2


def test_arith_response_from_hand_built_problem_is_a_user_error():
    with pytest.raises(UnmaskError, match="meta"):
        get_task("arith").sample_response(Problem("x", "tom has 3 pens .", "3"), random.Random(0))


def test_trace_answers_match_python():
    for problem in get_task("trace").problems("test")[:300]:
        source = problem.question.replace(" ; ", "\n").replace("print ( ", "result = (")
        scope = {}
        exec(source, {}, scope)  # the questions are our own generated assignments
        assert str(scope["result"]) == problem.answer


def test_trace_skips_or_traces_irrelevant_statements():
    task = get_task("trace")
    problem = next(p for p in task.problems("test") if len(trace.relevant_lines(*trace.parse_program(p.question))) < p.meta["statements"])
    rng = random.Random(5)
    lengths = {len(task.sample_response(problem, rng).split(" . ")) for _ in range(60)}
    assert len(lengths) > 2


def test_trace_orders_independent_statements_freely():
    task = get_task("trace")
    problem = Problem("t", "a = 3 ; b = 4 ; c = a + b ; print ( c )", "7")
    rng = random.Random(6)
    orders = Counter()
    for _ in range(60):
        response = task.sample_response(problem, rng)
        assert task.score(problem, response) == 1.0
        words = response.split()
        orders[words.index("a") < words.index("b")] += 1
    assert len(orders) == 2


def test_trace_never_reorders_dependent_statements():
    task = get_task("trace")
    problem = Problem("t", "a = 3 ; b = a + 2 ; a = b - 1 ; print ( a )", "4")
    rng = random.Random(7)
    for _ in range(60):
        response = task.sample_response(problem, rng)
        assert response.index("3 + 2") < response.index("5 - 1"), response  # every phrasing shows x op y


def traced_targets(response: str) -> list[str]:
    """The variable each line of a trace assigns, in order (opening, closing and answer dropped)."""
    targets = []
    for sentence in response.split(" . "):
        words = sentence.rstrip(" .").split()
        if words[0] in ("we", "so", "the"):
            continue
        if words[0] in trace.FIRST_CONNECTIVES + trace.LATER_CONNECTIVES:
            words = words[1:]
        targets.append(words[1] if words[0] == "set" else words[0])
    return targets


def test_trace_narrow_style_traces_every_statement_in_program_order():
    default, narrow = get_task("trace"), get_task("trace:skip=0,free_order=false")
    rng = random.Random(8)
    problems = default.problems("test")[:200]
    # the same problems and splits: the options shape the answers drawn, nothing else
    assert [p.question for p in narrow.problems("test")[:200]] == [p.question for p in problems]
    reordered_or_skipped = 0
    for problem in problems:
        statements, _ = trace.parse_program(problem.question)
        program = [s.target for s in statements]
        for _ in range(3):
            response = narrow.sample_response(problem, rng)
            assert narrow.score(problem, response) == 1.0
            assert traced_targets(response) == program, response  # the fallback too traces every one
        reordered_or_skipped += traced_targets(default.sample_response(problem, rng)) != program
    assert reordered_or_skipped > 20  # the default style does leave out and reorder statements


def test_trace_named_option_copies_the_statement_into_its_line():
    problem = Problem("t", "a = 3 ; b = a + 2 ; c = b - a ; print ( c )", "2")
    rng = random.Random(9)
    plain = [get_task("trace").sample_response(problem, rng) for _ in range(100)]
    named = [get_task("trace:named=1").sample_response(problem, rng) for _ in range(100)]
    both = ("b = a + 2 = 3 + 2 = 5 .", "c = b - a = 5 - 3 = 2 .")
    assert all(all(line in response for line in both) for response in named)
    assert sum(all(line in response for line in both) for response in plain) < 20  # 1 in 25 expected
    assert all(get_task("trace").score(problem, response) == 1.0 for response in named)


def test_trace_named_closing_names_the_printed_variable_before_the_answer():
    # prints an earlier variable: the case where a model answers with the last value it computed
    problem = Problem("t", "a = 3 ; b = a + 2 ; c = b - a ; print ( b )", "5")
    rng = random.Random(10)
    plain = [get_task("trace").sample_response(problem, rng) for _ in range(100)]
    named = [get_task("trace:closing=named").sample_response(problem, rng) for _ in range(100)]
    assert all(response.endswith("so b is 5 . the answer is 5 .") for response in named)
    assert 15 < sum(response.endswith("so b is 5 . the answer is 5 .") for response in plain) < 60  # 1 in 3
    assert all(get_task("trace").score(problem, response) == 1.0 for response in named)


def test_trace_fallback_keeps_what_the_options_fix_and_fits():
    default, narrow = get_task("trace"), get_task("trace:skip=0,free_order=false,named=1,closing=named")
    problems = [p for p in default.problems("test")[:300] if len(trace.parse_program(p.question)[0]) == 4]
    assert len(problems) > 50
    for problem in problems:
        assert default.fallback_response(problem) == default.shortest_response(problem)  # defaults: unchanged
        response = narrow.fallback_response(problem)
        assert count_tokens(response) <= trace.MAX_RESPONSE_TOKENS
        assert narrow.score(problem, response) == 1.0
        statements, printed = trace.parse_program(problem.question)
        assert traced_targets(response) == [s.target for s in statements]  # every statement, in order
        assert f"so {printed} is {problem.answer} ." in response


def test_trace_stop_early_ends_every_trace_on_the_printed_variable():
    task = get_task("trace:skip=0,free_order=false,stop_early=true")
    rng = random.Random(11)
    stopped = 0
    for problem in get_task("trace").problems("test")[:300]:
        statements, printed = trace.parse_program(problem.question)
        end = trace.last_assignment(statements, printed)
        assert statements[end].target == printed and all(s.target != printed for s in statements[end + 1:])
        for response in (task.sample_response(problem, rng), task.fallback_response(problem)):
            assert task.score(problem, response) == 1.0
            assert traced_targets(response) == [s.target for s in statements[: end + 1]], response
        stopped += end < len(statements) - 1
    assert stopped > 20  # programs that print an earlier variable are common


@pytest.mark.parametrize(
    "option",
    ["skip=1.5", "skip=-0.1", "skip=x", "free_order=maybe", "named=2", "named=-1", "closing=last", "stop_early=2"],
)
def test_trace_style_options_are_checked(option):
    with pytest.raises(UnmaskError, match="skip|free_order|named|closing|stop_early"):
        get_task(f"trace:{option}")


def test_trace_rejects_malformed_questions():
    with pytest.raises(UnmaskError, match="print"):
        get_task("trace").sample_response(Problem("t", "a = 3 ; b = a", "3"), random.Random(0))


def test_arith_working_check_names_only_the_problem_and_every_equation_holds():
    task = get_task("arith")
    problem = Problem("p", "tom has 5 toys . he loses 2 . mia has 3 toys . how many toys do they have together ?", "6")
    # 5 - 2 = 3 and 3 + 3 = 6 hold; tom, mia and toys are in the question
    assert task.working_consistent(problem, "tom has 5 - 2 = 3 toys . mia has 3 . 3 + 3 = 6 . the answer is 6 .")
    assert task.working_consistent(problem, "they have 5 - 2 + 3 = 6 toys . the answer is 6 .")  # a chain: 5 - 2 + 3 = 6
    assert task.working_consistent(problem, "the answer is 6 .")  # no names, no equations: nothing to contradict
    # a stranger (eva), a foreign item (coins), or an equation that does not hold (5 - 2 is 3, not 4;
    # 5 - 2 + 3 is 6, not 7)
    assert not task.working_consistent(problem, "eva has 5 - 2 = 3 toys . 3 + 3 = 6 . the answer is 6 .")
    assert not task.working_consistent(problem, "tom has 5 - 2 = 3 coins . 3 + 3 = 6 . the answer is 6 .")
    assert not task.working_consistent(problem, "tom has 5 - 2 = 4 toys . 4 + 2 = 6 . the answer is 6 .")
    assert not task.working_consistent(problem, "they have 5 - 2 + 3 = 7 toys . so 6 . the answer is 6 .")
    # a task with no check of the working accepts every completion
    other = get_task("trace")
    assert other.working_consistent(problem, "eva has 1 + 1 = 3 coins")
