"""How an answer is written and read, for every task: "<think>{reasoning}</think>\nAnswer: {answer}",
the answer a letter (multiple choice), a number (numeric) or text (open).
"""
import re

LETTERS = "ABCDE"  # option letters in order; a task with n options uses the first n (option_letters)
MARKER = "Answer:"
OPTION_MARK = "- "  # starts each option line
THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
WORD_RE = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")  # a word of letters (with inner apostrophes, hyphens)


def format_answer(reasoning, answer):
    """The gold assistant text of a task example."""
    return f"<think>{reasoning.strip()}</think>\n{MARKER} {answer}"


def answer_after(text):
    """Text after the last "Answer:" (stripped), or None when there is none."""
    i = text.rfind(MARKER)
    return None if i < 0 else text[i + len(MARKER):].strip()


def after_think(text):
    """Everything after the last </think> (the whole text when there is no think block)."""
    return text.rsplit("</think>", 1)[-1]


def think_content(text):
    """Text inside the first closed <think>...</think> block, or None when there is none."""
    m = THINK_RE.search(text)
    return m.group(1) if m else None


def answer_part(text):
    """The answer of an open completion: after the think block, without the (optional) "Answer:" label."""
    tail = after_think(text)
    after = answer_after(tail)
    return (after if after is not None else tail).strip()


def rationale_part(text):
    """The reasoning: inside <think>...</think> (or an unclosed <think>), else before the last "Answer:"."""
    m = re.search(r"<think>(.*?)(?:</think>|$)", text, flags=re.S)
    if m:
        return m.group(1).strip()
    return text.rpartition(MARKER)[0].strip() if MARKER in text else text.strip()


def option_line(letter, choice):
    """One option of a multiple-choice question, its letter right after its text: "- 72 C". A small
    model picks the letter by copying what followed the value it has just written, as an induction
    head copies; with the letter first ("C) 72") it must read the token before a match, and a depth-4
    model that copies did not learn that in 400 steps of option drills (docs/science_log.md)."""
    return f"{OPTION_MARK}{choice} {letter}"


def picked(choice, letter):
    """How a gold reasoning states its pick: as its option line ends ("72 C"), so the letter is
    the token that followed the choice there."""
    return f"{choice} {letter}"


def option_letters(n):
    """The letters of an n-option question: "ABCD" for MMLU's four, "ABCDE" for our five."""
    if not 2 <= n <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2 to {len(LETTERS)} options, got {n}")
    return LETTERS[:n]


def parse_letter(text):
    """"C", "C)", "(C)", "C) 600", "c." -> "C"; anything else -> None."""
    m = text and re.match(r"^[\s(\[*]*([A-Ea-e])(?![A-Za-z0-9])", text)
    return m.group(1).upper() if m else None


def parse_number(text):
    """First number in `text` ("$1,080.00" -> 1080.0), or None."""
    m = text and NUMBER_RE.search(text.replace("$", "").replace("−", "-"))
    try:
        return float(m.group(0).replace(",", "")) if m else None
    except ValueError:
        return None


def numbers_equal(a, b):
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def format_number(x):
    """72.0 -> "72", 0.5 -> "0.5"; the way a person writes an answer."""
    return str(int(round(x))) if abs(x - round(x)) < 1e-9 else f"{x:.6f}".rstrip("0").rstrip(".")
