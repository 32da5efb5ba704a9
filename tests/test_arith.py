"""Generated arithmetic: exact chains, held out by (template, numbers), depth recorded and
balanced, distractors from wrong steps that carry their own rationale, gated like any source."""
import collections
import re

import pytest

from nanostoney.answers import LETTERS
from nanostoney.errors import UserError
from nanostoney.governance import check_sources
from nanostoney.tasks import arith, get_task
from nanostoney.tasks.base import baselines, split_by_hash

LINE = re.compile(r"^(?:[^:\n]+: )?(\d+) ([-+*/]) (\d+) = (\d+)$")  # after the re-read sentence, if any


def chain_value(think, start):
    """Follow a rationale's lines, checking each uses the previous result; the last value."""
    a = start
    for line in think.split("\n"):
        m = LINE.match(line)
        assert m and int(m.group(1)) == a, (line, a)
        a = int(m.group(4))
    return a


def test_problems_are_exact_small_and_split_by_template_and_numbers():
    splits = arith.load_problems()
    keys = {s: {p["key"] for p in ps} for s, ps in splits.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    for split, ps in splits.items():
        for p in ps:
            assert split_by_hash(p["key"]) == split          # the hash of (template, numbers) decides
            assert 1 <= p["depth"] <= 4 and len(p["steps"]) == p["depth"]
            assert all(1 <= v <= arith.MAX_VALUE for v in [p["start"]] + p["values"])
            for (op, n), a, b in zip(p["steps"], [p["start"]] + p["values"], p["values"]):
                assert b == {"+": a + n, "-": a - n, "*": a * n, "/": a / n}[op]
            assert chain_value(p["rationale"], p["start"]) == p["final"]
    depths = {s: collections.Counter(p["depth"] for p in ps) for s, ps in splits.items()}
    assert all(depths["val"][d] >= 90 and depths["test"][d] >= 90 for d in arith.DEPTHS)
    assert arith.generate() == splits                          # deterministic


def test_a_combination_has_one_wording():
    """Names and objects are chosen by the hash of (template, numbers), so the same combination
    is always the same text, and no held-out question is a train question in other words."""
    splits = arith.load_problems()
    by_key = {p["key"]: p["question"] for ps in splits.values() for p in ps}
    template, numbers = next(iter(by_key)).split("|")
    nums = [int(x) for x in numbers.split(",")]
    again = arith.make_problem(tuple(int(t) for t in template.split(".")), nums[0], tuple(nums[1:]))
    assert again["question"] == by_key[again["key"]]
    assert len(set(by_key.values())) == len(by_key)


def test_mc_options_are_wrong_steps_with_their_own_rationale():
    task = get_task("arith_mc")
    for split in ("train", "val", "test"):
        by_depth = collections.defaultdict(collections.Counter)
        for ex in task.examples(split):
            by_depth[ex["depth"]][ex["answer"]] += 1
        for d, letters in by_depth.items():  # every depth letter-balanced on its own
            assert max(letters.values()) - min(letters.values()) <= 1, (split, d, letters)
    for ex in task.examples("val"):
        nums = [int(c) for c in ex["choices"]]
        assert nums == sorted(nums) and len(set(nums)) == 5
        start = int(re.search(r" has (\d+) ", ex["messages"][0]["content"]).group(1))
        for letter, text in ex["option_rationales"].items():
            think = text.split("<think>")[1].split("</think>")[0]
            lines, last = think.rsplit("\n", 1)
            value = int(ex["choices"][LETTERS.index(letter)])
            assert last == f"The answer is {value} {letter}."
            assert text.endswith(f"Answer: {letter}") and task.evaluate(ex, text) == (letter == ex["answer"])
            assert chain_value(lines, first_operand(lines)) == value
        assert ex["messages"][-1]["content"] == ex["option_rationales"][ex["answer"]]


def first_operand(lines):
    return int(LINE.match(lines.split("\n")[0]).group(1))


def test_every_distractor_line_is_true_so_only_reading_tells_the_gold():
    """Every line of every option's chain is a true equation that starts from the line before,
    so a checker of the arithmetic alone scores chance; a distractor is the question misread:
    its chain is the gold's with a number, the start or an operation read wrongly, or a step
    skipped, repeated or left out."""
    task = get_task("arith_mc")
    for split in ("train", "val", "test"):
        for ex in task.examples(split):
            gold = LINE.findall(ex["option_rationales"][ex["answer"]].split("</think>")[0])
            for letter, text in ex["option_rationales"].items():
                lines = [LINE.match(ln) for ln in text.split("<think>")[1].split("</think>")[0].split("\n")[:-1]]
                assert lines and all(lines), (ex["id"], text)
                for m in lines:
                    a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
                    assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op], (ex["id"], m.group(0))
                chain_value("\n".join(m.group(0) for m in lines), int(lines[0].group(1)))
                if letter != ex["answer"]:
                    assert [m.groups() for m in lines] != gold
        acc = baselines(task.examples(split))["line_checker"]
        assert abs(acc - 0.2) < 0.01, (split, acc)


def test_line_checker_finds_a_false_line():
    """The baseline is a real checker: given options whose distractors hold a false line, it
    picks the gold."""
    ex = dict(get_task("arith_mc").examples("val")[0])
    rats = dict(ex["option_rationales"])
    for letter in LETTERS:
        if letter != ex["answer"]:
            rats[letter] = "<think>2 + 2 = 5</think>\nAnswer: " + letter
    assert baselines([dict(ex, option_rationales=rats)])["line_checker"] == 1.0


def test_open_task_wrong_answers_are_wrong_chains():
    task = get_task("arith")
    for ex in task.splits()["val"][::10]:
        assert ex["wrong_answers"] and all(not task.evaluate(ex, w) for w in ex["wrong_answers"])
        assert task.evaluate(ex, ex["messages"][-1]["content"])


def test_generated_source_passes_the_gate_only_with_its_record(tmp_path):
    assert check_sources(get_task("arith_mc").sources())[0][1] == "arith_generated"
    manifest = tmp_path / "m.yml"
    manifest.write_text('schema_version: "1.0"\nrecords:\n  - source_id: other\n    path_glob: "generated://x"\n'
                        "    data_type: t\n    origin: o\n    rights_holder: r\n    permission_status: approved_for_training\n"
                        "    license: l\n    allowed_uses: [training]\n    prohibited_uses: []\n"
                        "    contains_sensitive_content: false\n    review_contact: c\n    notes: n\n")
    with pytest.raises(UserError, match="generated://nanostoney/arith may not be used for training"):
        check_sources(get_task("arith").sources(), manifest=str(manifest))
