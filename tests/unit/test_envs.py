"""Built-in tasks: deterministic problems, disjoint splits, and verifiers that score correct,
wrong and malformed completions as expected without ever raising."""

from __future__ import annotations

import pytest

from envs import DEFAULT_TASK, Problem, Split, UnknownTaskError, get_task, list_tasks, register_task
from envs.base import EVAL_BUCKETS, HashStream, MultiTurnTask, split_of_key
from envs.math_answer import answers_match, extract_final_answer, normalize_answer, parse_number
from envs.synthetic import AdditionTask, ReverseTask, SortTask, positional_match_reward
from policy.tokenizer import load_tokenizer

BUILT_IN_TASKS = ["addition", "calc", "code", "math", "reverse", "sort"]
MALFORMED_COMPLETIONS = [
    "",
    " ",
    "\n\n",
    "<eos>",
    "\x00\x01\xff",
    "ünïcødé ∑ 🙂",
    "{" * 500,
    "}" * 500,
    "\\boxed{",
    "\\boxed{}}}",
    "Answer:",
    "9" * 5000,
    "1e999999999",
    "0/0",
    "\\frac{1}{0}",
    "nan",
    "-inf",
]


def test_registry_lists_the_built_in_tasks_with_addition_as_default() -> None:
    assert list_tasks() == BUILT_IN_TASKS
    assert DEFAULT_TASK == "addition"
    assert all(get_task(name).name == name for name in BUILT_IN_TASKS)


def test_unknown_task_name_raises_an_actionable_error() -> None:
    with pytest.raises(UnknownTaskError, match="known tasks: addition, calc, code, math, reverse, sort"):
        get_task("no-such-task")
    with pytest.raises(ValueError, match="taken"):
        register_task("addition", AdditionTask)


@pytest.mark.parametrize("name", BUILT_IN_TASKS)
def test_problems_are_deterministic_and_depend_on_seed_and_index(name: str) -> None:
    task = get_task(name)
    first = task.problems(Split.TRAIN, seed=7, num_problems=50)
    assert first == get_task(name).problems(Split.TRAIN, seed=7, num_problems=50)
    assert first != task.problems(Split.TRAIN, seed=8, num_problems=50)
    assert len({problem.prompt for problem in first}) > 40


@pytest.mark.parametrize("name", BUILT_IN_TASKS)
def test_train_and_eval_splits_are_disjoint(name: str) -> None:
    task = get_task(name)
    train = {task.problem(Split.TRAIN, seed, index).key for seed in (0, 1) for index in range(300)}
    held_out = {task.problem(Split.EVAL, seed, index).key for seed in (0, 1) for index in range(300)}
    assert not train & held_out
    assert all(split_of_key(key) is Split.TRAIN for key in train)
    assert all(split_of_key(key) is Split.EVAL for key in held_out)


def test_about_one_key_in_eval_buckets_is_held_out() -> None:
    num_held_out = sum(split_of_key(str(number)) is Split.EVAL for number in range(10_000))
    assert 10_000 / EVAL_BUCKETS * 0.9 < num_held_out < 10_000 / EVAL_BUCKETS * 1.1


def test_hash_stream_is_reproducible_and_in_range() -> None:
    values = [HashStream("k").below(7) for _ in range(3)]
    assert values == [values[0]] * 3
    stream = HashStream("k")
    draws = [stream.between(3, 5) for _ in range(300)]
    assert set(draws) == {3, 4, 5}
    assert stream.below(2**64) < 2**64


def test_addition_problem_format_and_verifier() -> None:
    task = AdditionTask()
    problem = Problem(prompt="012+345=", answer="0357", key="012+345=")
    for right in ("0357", "357", " 357\n", "00357"):
        assert task.reward(problem, right) == 1.0, right
    for wrong in ("358", "3570", "357+1", "", "-357", "3 57", "３５７"):
        assert task.reward(problem, wrong) == 0.0, wrong
    for generated in task.problems(Split.TRAIN, seed=0, num_problems=100):
        left, right = generated.prompt.removesuffix("=").split("+")
        assert len(left) == len(right) == task.max_digits
        assert len(generated.answer) == task.max_digits + 1
        assert int(generated.answer) == int(left) + int(right)


def test_addition_without_fixed_width_writes_numbers_plainly() -> None:
    task = AdditionTask(fixed_width=False)
    for generated in task.problems(Split.TRAIN, seed=0, num_problems=100):
        left, right = generated.prompt.removesuffix("=").split("+")
        assert generated.answer == str(int(left) + int(right))
        assert all(1 <= len(operand) <= task.max_digits and str(int(operand)) == operand for operand in (left, right))


def test_reverse_verifier_gives_partial_credit_by_position() -> None:
    task = ReverseTask()
    problem = Problem(prompt="rev:abcd=", answer="dcba", key="rev:abcd=")
    assert task.reward(problem, "dcba") == 1.0
    assert task.reward(problem, "dcbx") == 0.75
    assert task.reward(problem, "dcb") == 0.75
    assert task.reward(problem, "dcbaa") == 0.8
    assert task.reward(problem, "abcd") == 0.0
    assert positional_match_reward("", "") == 1.0
    for generated in task.problems(Split.EVAL, seed=0, num_problems=20):
        assert generated.answer == generated.prompt.removeprefix("rev:").removesuffix("=")[::-1]


def test_sort_verifier_is_exact() -> None:
    task = SortTask()
    problem = Problem(prompt="sort:3141=", answer="1134", key="sort:3141=")
    assert task.reward(problem, "1134") == 1.0
    assert task.reward(problem, "1143") == 0.0
    assert task.reward(problem, "113") == 0.0
    for generated in task.problems(Split.TRAIN, seed=0, num_problems=20):
        digits = generated.prompt.removeprefix("sort:").removesuffix("=")
        assert generated.answer == "".join(sorted(digits))


def test_math_verifier_reads_boxed_or_answer_line() -> None:
    task = get_task("math")
    problem = Problem(prompt="What is 1/2 + 1/4?", answer="3/4", key="q")
    assert task.reward(problem, "so the sum is \\boxed{\\frac{3}{4}}.") == 1.0
    assert task.reward(problem, "first \\boxed{1} then \\boxed{0.75}") == 1.0
    assert task.reward(problem, "Reasoning...\nAnswer: 3/4") == 1.0
    assert task.reward(problem, "the answer is: $\\dfrac{6}{8}$") == 1.0
    assert task.reward(problem, "\\boxed{0.7}") == 0.0
    assert task.reward(problem, "3/4") == 0.0
    for generated in task.problems(Split.TRAIN, seed=0, num_problems=40):
        assert task.reward(generated, f"\\boxed{{{generated.answer}}}") == 1.0
        assert task.reward(generated, f"Answer: {generated.answer}") == 1.0


@pytest.mark.parametrize(
    ("reference", "given"),
    [
        ("1000", "1,000"),
        ("1000", "1000.0"),
        ("-3/4", "\\frac{-3}{4}"),
        ("-3/4", "-\\frac{3}{4}"),
        ("1/2", "\\frac12"),
        ("1/2", "0.5"),
        ("12", "12\\%"),
        ("12", "$12$"),
        ("12", " 12 ."),
        ("90", "90^\\circ"),
        ("5", "x = 5"),
        ("5", "\\text{5}"),
        ("x+1", "x + 1"),
    ],
)
def test_math_answers_match_after_normalisation(reference: str, given: str) -> None:
    assert answers_match(reference, given)


@pytest.mark.parametrize(("reference", "given"), [("1000", "100"), ("1/2", "2"), ("3", "3/0"), ("1,2", "12")])
def test_math_answers_differ(reference: str, given: str) -> None:
    assert not answers_match(reference, given)


def test_math_extraction_and_parsing_details() -> None:
    assert extract_final_answer("\\boxed{\\frac{1}{2}} and later \\boxed{x^{2}}") == "x^{2}"
    assert extract_final_answer("\\boxed{unclosed") is None
    assert extract_final_answer("no answer here") is None
    assert normalize_answer("\\left( 1 \\right)") == "1"
    assert parse_number("7" * 300) is None
    assert parse_number("abc") is None


def reference_completion(task, problem: Problem, tokenizer) -> str:
    """What the task's verifier scores for a reference answer: a multi-turn task's whole transcript."""
    if task.name == "math":
        return f"\\boxed{{{problem.answer}}}"
    if isinstance(task, MultiTurnTask):
        model_turns = tokenizer.encode(problem.answer, add_special_tokens=False)
        token_ids, _ = task.environment(problem, 0, tokenizer).transcript(model_turns)
        return tokenizer.decode(list(token_ids), skip_special_tokens=True)
    return problem.answer


@pytest.mark.parametrize("name", BUILT_IN_TASKS)
def test_verifiers_never_raise_and_stay_in_unit_interval(name: str, tiny_model) -> None:
    task = get_task(name)
    tokenizer = load_tokenizer(tiny_model)
    for problem in task.problems(Split.EVAL, seed=0, num_problems=5):
        for completion in MALFORMED_COMPLETIONS:
            reward = task.reward(problem, completion)
            # Partial credit can match a stray character by position; the others score 0.
            assert 0.0 <= reward < 0.5 if name == "reverse" else reward == 0.0
        assert task.reward(problem, reference_completion(task, problem, tokenizer)) == 1.0


def test_negative_index_is_a_user_error() -> None:
    with pytest.raises(ValueError, match="index"):
        get_task("addition").problem(Split.TRAIN, seed=0, index=-1)
