"""A math-answer task for real LLMs: the final answer is read from `\\boxed{...}` or an
`Answer:` line, normalised (numbers, fractions, thousands separators, LaTeX wrappers,
whitespace) and compared with the reference."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from envs.base import GeneratedTask, HashStream, Problem

MAX_ANSWER_CHARS = 200
"""Longer extracted answers are compared as text only (no number parsing)."""

BOXED_COMMANDS = ("\\boxed", "\\fbox")
ANSWER_LINE = re.compile(r"answer\s*(?:is)?\s*[:：]\s*(.+)", re.IGNORECASE)
NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
THOUSANDS_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
LATEX_FRACTION = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
LATEX_SHORT_FRACTION = re.compile(r"\\[dt]?frac(\d)(\d)")
VARIABLE_ASSIGNMENT = re.compile(r"[a-z]=(.+)")
TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
DROPPED_FRAGMENTS = (
    "\\left",
    "\\right",
    "\\displaystyle",
    "\\!",
    "\\,",
    "\\;",
    "\\:",
    "\\ ",
    "^{\\circ}",
    "^\\circ",
    "°",
    "\\%",
    "%",
    "$",
)


def last_boxed_content(text: str) -> str | None:
    """The brace-balanced content of the last `\\boxed{...}` (or `\\fbox{...}`), if closed."""
    start = max(text.rfind(command + "{") for command in BOXED_COMMANDS)
    if start < 0:
        return None
    open_brace = text.index("{", start)
    depth = 0
    for position in range(open_brace, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : position]
    return None


def extract_final_answer(completion: str) -> str | None:
    """The final answer stated in a completion: the last `\\boxed{}`, else the last `Answer:` line."""
    boxed = last_boxed_content(completion)
    if boxed is not None:
        return boxed
    matches = ANSWER_LINE.findall(completion)
    return matches[-1] if matches else None


def normalize_answer(answer: str) -> str:
    """A canonical text form: LaTeX wrappers and spacing removed, fractions as `a/b`."""
    text = answer.strip()
    for _ in range(3):
        text = TEXT_WRAPPER.sub(r"\1", text)
    for fragment in DROPPED_FRAGMENTS:
        text = text.replace(fragment, "")
    text = LATEX_SHORT_FRACTION.sub(r"\1/\2", text)
    text = LATEX_FRACTION.sub(r"(\1)/(\2)", text)
    text = re.sub(r"\s+", "", text)
    text = re.sub(r"\((-?\d+)\)", r"\1", text)
    if THOUSANDS_GROUPED.fullmatch(text):
        text = text.replace(",", "")
    text = text.rstrip(".").lower()
    assignment = VARIABLE_ASSIGNMENT.fullmatch(text)
    return assignment.group(1) if assignment else text


def parse_number(text: str) -> Fraction | None:
    """An exact value for `12`, `-0.5`, `3/4`, `-3/4`, `3/-4`; None for anything else."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    numerator_text, slash, denominator_text = text.partition("/")
    if not NUMBER.fullmatch(numerator_text):
        return None
    numerator = Fraction(numerator_text)
    if not slash:
        return numerator
    if not NUMBER.fullmatch(denominator_text):
        return None
    denominator = Fraction(denominator_text)
    return None if denominator == 0 else numerator / denominator


def answers_match(reference: str, given: str) -> bool:
    reference_text, given_text = normalize_answer(reference), normalize_answer(given)
    reference_value, given_value = parse_number(reference_text), parse_number(given_text)
    if reference_value is not None and given_value is not None:
        return reference_value == given_value
    return reference_text == given_text


def format_fraction(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


INSTRUCTION = "Give the final answer in \\boxed{}."


def fraction_sum_problem(stream: HashStream) -> tuple[str, str]:
    a, b = stream.between(1, 9), stream.between(2, 12)
    c, d = stream.between(1, 9), stream.between(2, 12)
    question = f"What is $\\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{d}}}$? Write it as a reduced fraction."
    return question, format_fraction(Fraction(a, b) + Fraction(c, d))


def linear_equation_problem(stream: HashStream) -> tuple[str, str]:
    slope, solution, offset = stream.between(2, 12), stream.between(-20, 20), stream.between(-50, 50)
    question = f"Solve for $x$: ${slope}x {'+' if offset >= 0 else '-'} {abs(offset)} = {slope * solution + offset}$."
    return question, str(solution)


def percentage_problem(stream: HashStream) -> tuple[str, str]:
    percent, whole = stream.choice((5, 10, 12, 15, 20, 25, 30, 40, 75)), stream.between(2, 80) * 20
    question = f"What is {percent}% of {whole}?"
    return question, format_fraction(Fraction(percent * whole, 100))


def product_problem(stream: HashStream) -> tuple[str, str]:
    left, right = stream.between(11, 999), stream.between(11, 999)
    return f"Compute ${left} \\times {right}$.", str(left * right)


PROBLEM_KINDS = (fraction_sum_problem, linear_equation_problem, percentage_problem, product_problem)


@dataclass(frozen=True)
class MathAnswerTask(GeneratedTask):
    """Generated arithmetic and algebra questions with exact answers, for instruction-tuned LLMs."""

    name: str = "math"
    description: str = "math questions; the answer in \\boxed{} or after 'Answer:' must equal the reference"

    def generate(self, stream: HashStream) -> Problem:
        question, answer = stream.choice(PROBLEM_KINDS)(stream)
        prompt = f"{question} {INSTRUCTION}"
        return Problem(prompt=prompt, answer=answer, key=prompt)

    def reward(self, problem: Problem, completion: str) -> float:
        given = extract_final_answer(completion)
        return 1.0 if given is not None and answers_match(problem.answer, given) else 0.0
