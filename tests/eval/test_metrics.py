"""Every metric on hand-worked cases: right answers, near misses, malformed replies; RougeLsum
against Google's rouge-score on real GovReport summaries."""

import json
import os
import re

import pytest

from eval import exact_match, field_accuracy, finqa_accuracy, json_match, mcq_accuracy, rouge_lsum
from eval.metrics import METRICS, aggregate
from tests.fixtures import FIXTURES, needs_fixtures

# --- FinQA accuracy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, gold, right",
    [
        ("The answer is 94.", "94.0", True),
        ("so the change is 94.1 million", "94.0", False),  # 0.106% off... of 94 is 0.141: within 0.15%?
        ("Net change: 5,829 - 5,735 = 94", "94.0", True),  # the last number
        ("The answer is 94. That is 2% of 4,700.", "94.0", True),  # the number after the marker wins
        ("(12)", "-12", True),  # accounting negative
        ("-3.4%", "-3.4", True),
        ("0.034", "3.4", True),  # a fraction for a percent: factor 100
        ("340", "3.4", True),  # and the other way
        ("$5 million", "5", True),  # scale words are units
        ("1,234.5 in total", "1234.5", True),
        ("53.12%", "53.1", True),  # rounded to the gold's decimals
        ("53.16%", "53.1", False),  # 53.2 after rounding, and 0.11% off... no: 0.113% -> within tolerance
        ("0.5312", "0.53", True),
        ("0.54", "0.53", False),  # a near miss: 1.9% off, rounds to 0.54
        ("100.16", "100", False),  # 0.16% off: just outside the tolerance, rounds to 100 -> right? see below
        ("Yes, it did.", "yes", True),
        ("No.", "yes", False),
        ("<think>5 - 3 = 2, no wait</think>The answer is 7", "7", True),  # scored after the trace
    ],
)
def test_finqa_accuracy(reply, gold, right):
    expected = {  # cases whose outcome follows from two rules at once, worked out here:
        ("so the change is 94.1 million", "94.0"): True,  # |94.1-94| = 0.1 <= 0.0015*94 = 0.141
        ("53.16%", "53.1"): True,  # |53.16-53.1| = 0.06 <= 0.0797
        ("100.16", "100"): True,  # 0.16 > 0.15, but rounded to the gold's 0 decimals: 100 == 100
    }.get((reply, gold), right)
    assert finqa_accuracy.score(reply, gold).score == float(expected)


def test_finqa_format_failures_and_parsing():
    assert finqa_accuracy.score("I cannot tell from the table.", "94.0").format_failure
    assert finqa_accuracy.score("", "94.0").format_failure
    assert finqa_accuracy.score("<think>94", "94.0").format_failure  # the trace never closed: no answer
    assert finqa_accuracy.score("maybe", "no").format_failure
    assert finqa_accuracy.parse_numbers("2019-2020: -5.2% or (3), page-23, $.5") == [2019, 2020, -5.2, -3, 23, 0.5]
    assert finqa_accuracy.score("__import__('os')", "1").format_failure  # parsed, never evaluated
    with pytest.raises(ValueError, match="not a number or yes/no"):
        finqa_accuracy.score("5", "n/a")


# --- strict MCQ -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, letter",
    [("C", "C"), ("C.", "C"), ("(C)", "C"), ("C. 11 mm", "C"), ("C)", "C"), ("Answer: C", "C")]
    + [("The answer is (C)", "C"), ("Answer: C because of x", "C"), ("<think>A or C?</think>\nC. 11 mm", "C")]
    + [("C. Vitamin D.", "C"), ("B", "B")],
)
def test_mcq_accepted_forms(reply, letter):
    assert mcq_accuracy.parse_letter(reply) == (letter, "")
    assert mcq_accuracy.score(reply, "C").score == float(letter == "C")


@pytest.mark.parametrize(
    "reply, why",
    [
        ("", "empty answer"),
        ("I think it is C", "no option letter at the start"),
        ("11 mm", "no option letter at the start"),  # the option text without its letter
        ("A 45-year-old man has", "no option letter at the start"),  # prose, not a letter
        ("c.", "no option letter at the start"),  # lower case
        ("E.", "no option letter at the start"),  # not one of the question's options
        ("A. or C.", "several letters (A, C)"),
        ("B) and D)", "several letters (B, D)"),
    ],
)
def test_mcq_format_failures(reply, why):
    s = mcq_accuracy.score(reply, "C")
    assert s.score == 0.0 and s.format_failure == why
    assert mcq_accuracy.parse_letter("E.", letters="ABCDE") == ("E", "")


# --- CoCoHD key/value match -----------------------------------------------------------------------

REF = {"title": "Hearing on Ports", "chamber": "Senate", "members_present": ["Chen", "Ellis"], "witnesses": ["Dr. Lee"]}


def test_json_match_hand_worked():
    reply = 'Here it is: {"title": "hearing on ports", "chamber": "House", "members_present": ["Chen", "Brooks"]} ok'
    s = json_match.score(reply, json.dumps(REF))
    # keys: 3 of 4 present; values: title 1, chamber 0, members |{chen}|/|{chen, ellis, brooks}| = 1/3
    assert s.details["key_rate"] == pytest.approx(0.75)
    assert s.details["value_rate"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert s.score == pytest.approx((0.75 + 4 / 9) / 2) and not s.format_failure
    assert json_match.score(json.dumps(REF), REF).score == 1.0
    assert json_match.score("```json\n" + json.dumps(REF) + "\n```", REF).score == 1.0
    assert json_match.score('{"other": 1}', REF).score == 0.0  # parseable, nothing matches: not a format failure


@pytest.mark.parametrize(
    "reply, why",
    [("", "no parseable JSON"), ("The hearing was about ports.", "no parseable JSON")]
    + [('[{"title": "x"}]', "JSON list, not an object"), ('{"title": "x"', "no parseable JSON")],
)
def test_json_match_malformed(reply, why):
    s = json_match.score(reply, REF)
    assert s.score == 0.0 and s.format_failure == why


def test_json_bad_reference_is_refused():
    with pytest.raises(ValueError, match="reference is not a non-empty JSON object"):
        json_match.score("{}", "{}")


# --- Invoice field accuracy, LLaVA-CoT exact match ------------------------------------------------


def test_field_accuracy_over_key_paths():
    ref = {"header": {"invoice_no": "61356291", "seller": "Chapman"}, "items": [{"qty": "5,00"}, {"qty": "4,00"}]}
    reply = json.dumps(
        {"header": {"invoice_no": "61356291", "seller": "CHAPMAN", "extra": 1}, "items": [{"qty": "5,00"}]}
    )
    s = field_accuracy.score(reply, ref)  # 3 of 4 paths (items.1.qty is missing); extra paths ignored
    assert s.score == 0.75 and s.details == {"fields": 4, "right": 3}
    assert field_accuracy.score("no json", ref).format_failure == "no parseable JSON"


@pytest.mark.parametrize(
    "reply, right",
    [("<CONCLUSION> **B** </CONCLUSION>", True), ("<CONCLUSION> B: 5 MPa </CONCLUSION>", True)]
    + [("<CONCLUSION>(B) 5 MPa</CONCLUSION>", True), ("<CONCLUSION> C </CONCLUSION>", False)]
    + [("<CONCLUSION> Because </CONCLUSION>", False)],
)
def test_exact_match_of_conclusions(reply, right):
    assert exact_match.score(reply, "<SUMMARY>s</SUMMARY><CONCLUSION> **B** </CONCLUSION>").score == float(right)


def test_exact_match_text_and_missing_tags():
    ref = "<CONCLUSION> 5 MPa. </CONCLUSION>"
    assert exact_match.score("<CONCLUSION>5 mpa</CONCLUSION>", ref).score == 1.0
    assert exact_match.score("<CONCLUSION>6 mpa</CONCLUSION>", ref).score == 0.0
    assert exact_match.score("The answer is B", ref).format_failure == "no <CONCLUSION> tags"


# --- RougeLsum ------------------------------------------------------------------------------------


def test_sentence_splitter_needs_no_data():
    text = 'GAO found gaps. It recommends 3 steps! Why? "Costs" rose.\nA new line starts here e.g. this one.'
    assert rouge_lsum.split_sentences(text).splitlines() == [
        "GAO found gaps.",
        "It recommends 3 steps!",
        "Why?",
        '"Costs" rose.',
        "A new line starts here e.g. this one.",
    ]


def test_rouge_lsum_hand_worked():
    # reference sentences "the cat sat" / "the dog ran", summary "the cat ran": union LCS of each
    # reference sentence with the summary: s1 {the, cat}, s2 {the, ran}; a summary token counts once
    # in all ("the" is used by s1), so hits = the, cat, ran = 3: recall 3/6, precision 3/3, F = 2/3.
    s = rouge_lsum.score("the cat ran", "the cat sat. The dog ran.")
    assert s.details["recall"] == pytest.approx(0.5) and s.details["precision"] == pytest.approx(1.0)
    assert s.score == pytest.approx(2 / 3)
    from rouge_score import rouge_scorer

    expected = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True).score(
        "the cat sat.\nThe dog ran.", "the cat ran"
    )["rougeLsum"]
    assert s.score == pytest.approx(expected.fmeasure, abs=1e-12)
    assert rouge_lsum.score("", "the cat sat.").format_failure == "empty summary"


@needs_fixtures
def test_rouge_lsum_equals_rouge_score_on_real_govreport_summaries():
    from rouge_score import rouge_scorer

    rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "govreport/leval_gov_report_sample.jsonl"))]
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    refs = [r["output"] for r in rows]
    for i, ref in enumerate(refs):
        summary = refs[(i + 1) % len(refs)][: len(ref) // 2] + " " + ref[len(ref) // 3 :]  # overlapping text
        ours = rouge_lsum.score(summary, ref).score
        theirs = scorer.score(rouge_lsum.split_sentences(ref), rouge_lsum.split_sentences(summary))["rougeLsum"]
        assert abs(ours - theirs.fmeasure) <= 1e-6
        assert 0.0 < ours < 1.0
    # rougeLsum differs from rougeL once sentences are split: the reference's sentences in reverse
    # order keep every sentence's LCS (rougeLsum 1) but break the one long LCS (rougeL < 1)
    reordered = "\n".join(reversed(rouge_lsum.split_sentences(refs[0]).splitlines()))
    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(refs[0], reordered)["rougeL"].fmeasure
    assert rouge_lsum.score(reordered, refs[0]).score == pytest.approx(1.0) and plain < 0.9


def test_registry_and_aggregate():
    assert set(METRICS) == {"finqa_accuracy", "rouge_lsum", "mcq_accuracy", "json_key_value_match"} | {
        "exact_match",
        "field_accuracy",
        "teacher_agreement",  # the planted study's (tests/run/test_planted.py)
    }
    scores = [mcq_accuracy.score(r, "C") for r in ("C.", "B.", "I think C")]
    assert aggregate(scores, bad_references=1) == {
        "score": pytest.approx(1 / 3),
        "num_examples": 3,
        "format_failures": 1,
        "bad_references": 1,
    }


# --- Issue 20: scoring defects ---------------------------------------------------------------------


def _medmcqa_records(rows: list[dict], tmp_path) -> list[dict]:
    """MedMCQA rows (raw GitHub schema) -> evaluation records, through the builder's own parser."""
    from data.medmcqa.builder import parse_rows

    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [ex for _, ex in parse_rows(path, cop_base=1)]


def _echo(replies: dict):
    """A completion function that answers each record with replies[id] (the prompt's length is unused)."""
    return lambda records, suite: [(0, replies[r["id"]]) for r in records]


def _suite(metric: str):
    from eval.suites import Suite

    return Suite("s", "test", metric, 0, 8, (), 1, 0, 0.0, 0)


# MedMCQA-style options whose text holds option letters (the examples of a common MedMCQA form)
LETTERED = [
    {"id": "both", "question": "q1", "opa": "Vitamin A", "opb": "Vitamin B12", "opc": "Neither", "opd": "Both A and B"},
    {"id": "vit", "question": "q2", "opa": "Vitamin D and E", "opb": "Iron", "opc": "Zinc", "opd": "Iodine"},
    {"id": "hep", "question": "q3", "opa": "Hepatitis A", "opb": "Hepatitis B and C", "opc": "HIV", "opd": "None"},
]


def test_mcq_reply_in_the_trained_form_with_letters_in_its_option_text_is_one_answer(tmp_path):
    """Issue 20.1: `D. Both A and B` (exactly the training target) is the letter D, not "several letters"."""
    from eval.generation_suite import run_suite

    rows = [dict(r, cop=c) for r, c in zip(LETTERED, (4, 1, 2))]
    records = _medmcqa_records(rows, tmp_path)
    targets = {r["id"]: r["target"] for r in records}
    assert targets == {"both": "D. Both A and B", "vit": "A. Vitamin D and E", "hep": "B. Hepatitis B and C"}
    result = run_suite(records, _suite("mcq_accuracy"), _echo(targets))
    assert (result["score"], result["format_failures"]) == (1.0, 0), result["examples"]
    # a prefix of the option text is the same one answer; offering a second letter is still a failure
    replies = {"both": "D. Both A", "vit": "A. Vitamin D and E or B. Iron", "hep": "B. Hepatitis B or C"}
    rows_out = {r["id"]: r for r in run_suite(records, _suite("mcq_accuracy"), _echo(replies))["examples"]}
    assert rows_out["both"]["score"] == 1.0 and not rows_out["both"]["format_failure"]
    assert rows_out["vit"]["format_failure"] == "several letters (A, B)"
    assert rows_out["hep"]["format_failure"] == "several letters (B, C)"


@pytest.mark.parametrize(
    "reply, why",
    [
        ("D. Both A and B", ""),
        ("(D) both a and b.", ""),
        ("Answer: D. Both A", ""),
        ("D. Both A and B because of x", ""),
    ]
    + [("A or D", "no option letter at the start"), ("A/D", "no option letter at the start")]
    + [("A. Vitamin A or C. Neither", "several letters (A, C)"), ("D. Both A or C", "several letters (C, D)")]
    + [("D. Both A and B, or C", "several letters (C, D)"), ("C. Vitamin D and E", "several letters (C, E)")],
)
def test_mcq_letters_inside_the_chosen_option_text(reply, why):
    """Only the chosen letter's own text (equal, a word prefix, or followed by more text) may hold letters."""
    from eval.scored import ReplyContext

    options = {"A": "Vitamin A", "B": "Vitamin B12", "C": "Neither", "D": "Both A and B"}
    s = mcq_accuracy.score(reply, "D", ReplyContext(options=options))
    assert s.format_failure == why and s.score == float(not why)


@needs_fixtures
def test_mcq_on_real_medmcqa_and_medreason_options(tmp_path):
    """Real records: the options read back from the prompt are the record's, and every trained-form reply,
    and every word prefix of it, is its one letter — options with option letters in them included
    ("Category B concerns with low risk cases", "ACA", "Purkinje fibers > AV node > ventricles > atria"); two real options offered together
    are a format failure."""
    from data.mcq_options import option_lines, parse_option_lines
    from data.medmcqa.builder import INSTRUCTION
    from data.medreason.builder import parse_options
    from eval.generation_suite import Completion, reply_context

    raw = [json.loads(line) for line in open(os.path.join(FIXTURES, "medmcqa/dev_raw_sample.jsonl"))]
    questions = [
        (ex, {k: str(raw_row["op" + k.lower()]) for k in "ABCD"})
        for ex, raw_row in zip(_medmcqa_records(raw, tmp_path), raw)
    ]
    for name in ("medreason_evalformat_medbullets_op4_sample.jsonl", "medreason_evalformat_medqa_test_sample.jsonl"):
        for line in open(os.path.join(FIXTURES, "medreason", name)):
            row = json.loads(line)
            options = parse_options(row["options"], name)  # the MedReason builder's reading of `options`
            instruction = f"{INSTRUCTION}\n\n{row['question']}\n{option_lines(options)}"
            questions.append(
                ({"id": row["question"][:20], "instruction": instruction, "answer": row["answer_idx"]}, options)
            )
    assert len(questions) == 28
    lettered = {t for _, opts in questions for t in opts.values() if re.search(r"(?<!^)[A-J]", t)}
    assert {
        "Category B concerns with low risk cases",
        "ACA",
        "Purkinje fibers > AV node > ventricles > atria",
    } <= lettered
    for record, options in questions:
        context = reply_context(record, Completion(0, ""))
        assert context.options == {k: v.strip() for k, v in options.items()}, record["id"]
        assert parse_option_lines(record["instruction"]) == context.options
        letters = list(options)
        for letter, text in options.items():
            words = text.split()
            for n in range(len(words) + 1):  # the letter alone, each word prefix, the whole option
                reply = f"{letter}. {' '.join(words[:n])}".strip()
                s = mcq_accuracy.score(reply, letter, context)
                assert (s.score, s.format_failure) == (1.0, ""), (reply, s)
            other = letters[(letters.index(letter) + 1) % len(letters)]
            s = mcq_accuracy.score(f"{letter}. {text} or {other}. {options[other]}", letter, context)
            assert s.format_failure == f"several letters ({', '.join(sorted({letter, other}))})", s


def test_mcq_option_listing_reads_back_only_a_final_listing():
    from data.mcq_options import option_lines, parse_option_lines

    options = {"A": "Type I and II", "B": "All of the above", "C": "line one\nline two", "D": ""}
    text = "Which?\nA. a distractor in the stem\n" + option_lines(options)
    assert parse_option_lines(text) == options
    assert parse_option_lines("Summarize the report below.") == {}
    assert parse_option_lines("A. x\nB. y\nA. z") == {}  # the last A does not start a full listing
    assert parse_option_lines("A. x\nC. y") == {}  # not consecutive letters


@pytest.mark.parametrize(
    "reply, gold, right",
    [("2.4", "2", False), ("0.6", "1", False), ("3.14", "3.1", False), ("3.1", "3.14", False)]
    + [("0.4", "0", False), ("1.6", "2", False)]
    + [("15.32", "15.3", True), ("15.3", "15.32", True), ("0.5312", "0.53", True), ("50%", "0.5", True)]
    + [("1234.4", "1234", True), ("100.16", "100", True)],
)
def test_finqa_rounding_never_accepts_more_than_half_a_percent(reply, gold, right):
    """Issue 20.2: rounding to the gold's decimals gave an integer gold a ±0.5 window (2 accepted 2.4)."""
    assert finqa_accuracy.score(f"The answer is {reply}", gold).score == float(right)


def test_finqa_no_accepted_reply_is_more_than_half_a_percent_off():
    """Every accepted reply, over a grid around golds written with 0-3 decimals, is within 0.5% of the
    gold, or within 0.15% of it as the x100 / /100 percent form."""
    golds = ["2", "1", "15", "1234", "3.1", "0.5", "15.3", "-7.25", "0.53", "0.125"]
    accepted = 0
    for gold in golds:
        g = float(gold)
        for step in range(-120, 121):
            p = g * (1 + step / 1000)  # -12% .. +12% in 0.1% steps
            if finqa_accuracy.numbers_match(p, gold):
                accepted += 1
                percent = min(abs(p * 100 - g), abs(p / 100 - g)) <= 0.0015 * abs(g)
                assert abs(p - g) <= 0.005 * abs(g) + 1e-12 or percent, (p, gold)
    assert accepted >= 3 * len(golds)  # the exact gold and the 0.1% neighbours at least


@pytest.mark.parametrize(
    "conclusion, reference, right",
    [("A cat is on the mat.", "A", False), ("I think C", "I", False), ("A 5 MPa load", "A", False)]
    + [("B", "B", True), ("B.", "B", True), ("B: 5 MPa", "B", True), ("B) 5 MPa", "B", True)]
    + [("(B) 5 MPa", "B", True), ("**B**. 5 MPa", "B", True), ("C: 5 MPa", "B", False)],
)
def test_exact_match_letter_only_when_marked_as_an_option(conclusion, reference, right):
    """Issue 20.3: a conclusion that merely starts with the reference letter ("A cat …") is not option A."""
    s = exact_match.score(f"<CONCLUSION>{conclusion}</CONCLUSION>", f"<CONCLUSION>{reference}</CONCLUSION>")
    assert s.score == float(right)


@pytest.mark.parametrize(
    "conclusion, reference, right",
    [("B", "B: 5 MPa", True), ("(B)", "B: 5 MPa", True), ("**B**.", "(B) 5 MPa", True), ("B: 5 MPa", "B", True)]
    + [("C", "B: 5 MPa", False), ("C: 5 MPa", "B: 5 MPa", False), ("A", "A cat is on the mat.", False)]
    + [("A cat is on the mat.", "A", False), ("I", "I think C", False)],
)
def test_exact_match_letters_decide_when_the_reference_is_an_option(conclusion, reference, right):
    """Reply `B` against the reference conclusion `B: 5 MPa` (LLaVA-CoT's own form) is option B, as
    reply `B: 5 MPa` against reference `B` is; text that merely starts with a letter is no option."""
    s = exact_match.score(f"<CONCLUSION>{conclusion}</CONCLUSION>", f"<CONCLUSION>{reference}</CONCLUSION>")
    assert s.score == float(right)


@needs_fixtures
def test_exact_match_on_real_llava_cot_conclusions():
    rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "llava_cot/readme_examples.jsonl"))]
    for row in rows:
        answer = row["llava_cot_output"]
        found = exact_match.conclusion(answer)
        assert found and exact_match.score(answer, answer).score == 1.0
        letter = re.match(r"\W*([A-Z])\b", found)
        if letter:  # a letter conclusion also matches that bare letter as the reference, and back
            assert exact_match.score(answer, letter.group(1)).score == 1.0, found
            assert exact_match.score(f"<CONCLUSION>{letter.group(1)}</CONCLUSION>", answer).score == 1.0, found


TRACE_REPLY = "Revenue rose from 100 to 142, so the change is 42"  # ran out of tokens before </think>


def test_unclosed_trace_is_a_format_failure_for_every_metric():
    """Issue 20.4: when the prompt opened <think>, a reply without </think> has no answer."""
    from eval.answer_text import UNCLOSED_TRACE
    from eval.scored import ReplyContext

    opened = ReplyContext(think_opened=True)
    cases = {
        "finqa_accuracy": (TRACE_REPLY, "42"),
        "mcq_accuracy": ("C. 11 mm", "C"),
        "json_key_value_match": ('{"title": "x"}', json.dumps({"title": "x"})),
        "field_accuracy": ('{"title": "x"}', json.dumps({"title": "x"})),
        "exact_match": ("<CONCLUSION>B</CONCLUSION>", "B"),
    }
    for name, (reply, reference) in cases.items():
        metric = METRICS[name]
        assert metric(reply, reference, None).score == 1.0, name  # the prompt did not open a trace
        s = metric(reply, reference, opened)
        assert (s.score, s.format_failure) == (0.0, UNCLOSED_TRACE), name
        assert metric("the trace\n</think>\n\n" + reply, reference, opened).score == 1.0, name


def test_suite_fails_an_unclosed_trace_when_the_prompt_opened_it():
    from eval.answer_text import UNCLOSED_TRACE
    from eval.generation_suite import Completion, run_suite

    records = [{"id": i, "instruction": "q", "answer": "42"} for i in ("open", "closed", "plain")]
    replies = {
        "open": Completion(5, TRACE_REPLY, True),
        "closed": Completion(5, TRACE_REPLY + "\n</think>\n\nThe answer is 42", True),
        "plain": Completion(5, "The answer is 42", False),
    }
    result = run_suite(records, _suite("finqa_accuracy"), lambda records, suite: [replies[r["id"]] for r in records])
    rows = {r["id"]: r for r in result["examples"]}
    assert rows["open"]["score"] == 0.0 and rows["open"]["format_failure"] == UNCLOSED_TRACE
    assert rows["closed"]["score"] == rows["plain"]["score"] == 1.0
    assert result["format_failures"] == 1
    # every metric, also one that reads the trace itself as text (a summary): RougeLsum
    summary = [{"id": "open", "instruction": "q", "answer": TRACE_REPLY}]
    out = run_suite(summary, _suite("rouge_lsum"), lambda records, suite: [Completion(5, TRACE_REPLY, True)])
    assert out["examples"][0]["format_failure"] == UNCLOSED_TRACE and out["score"] == 0.0


@pytest.mark.parametrize("family, opens", [("deepseek-r1-distill", True), ("deepseek-r1-distill-2024", False)])
def test_completions_say_whether_the_prompt_opened_the_trace(tmp_path, monkeypatch, family, opens):
    """completion_fn marks each completion with whether the template's generation prompt opened <think>
    (DeepSeek-R1-Distill 2025 does, its 2024 revision does not); decoding is replaced by a fixed reply
    (generation itself is tested in tests/serve/test_generate.py)."""
    import types

    from data.sft import SFTOptions
    from data.tokenizer import Tokenizer
    from eval.generation_suite import run_suite
    from lora_jax.run import eval_hooks
    from lora_jax.run.eval_hooks import completion_fn
    from tests.chat_templates import REASONING_FAMILIES, make_tokenizer_dir

    tok = Tokenizer(str(make_tokenizer_dir(tmp_path, family, REASONING_FAMILIES)))
    assert tok.render([{"role": "user", "content": "q"}], True).endswith("<think>\n") is opens
    monkeypatch.setattr(eval_hooks, "complete", lambda model, rows, *a, **k: [TRACE_REPLY] * len(rows))
    model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=512))
    complete = completion_fn(lambda: model, tok, SFTOptions(max_seq_len=512))
    records = [{"id": "x", "instruction": "What is the net change in revenue?", "answer": "42"}]
    row = run_suite(records, _suite("finqa_accuracy"), complete)["examples"][0]
    # opened: the reply is all trace, and its "42" is no answer; not opened: the reply is the answer
    assert row["score"] == float(not opens) and bool(row["format_failure"]) is opens
    (completion,) = complete(records, _suite("finqa_accuracy"))
    assert completion.think_opened is opens and completion.reply == TRACE_REPLY
    from data.sft import prompt_opens_think

    assert prompt_opens_think(tok) is opens


def test_reference_with_only_empty_containers_is_a_bad_reference():
    """Issue 20.5: {"items": []} has no field to score: counted under bad_references, not a crash."""
    from eval.generation_suite import run_suite

    with pytest.raises(ValueError, match="no fields to score"):
        field_accuracy.score('{"items": []}', {"items": []})
    records = [
        {"id": "empty", "instruction": "q", "answer": json.dumps({"items": [], "summary": {}})},
        {"id": "ok", "instruction": "q", "answer": json.dumps({"items": [{"qty": "5"}]})},
    ]
    result = run_suite(records, _suite("field_accuracy"), _echo({"empty": "{}", "ok": '{"items": [{"qty": "5"}]}'}))
    assert result["bad_references"] == 1 and result["num_examples"] == 1 and result["score"] == 1.0
    assert result["examples"][0]["bad_reference"].startswith("reference has no fields to score")


def test_a_bug_in_a_metric_is_not_a_silent_zero(monkeypatch):
    """Only ValueError (a reference the metric cannot read) is counted; any other exception propagates."""
    from eval import generation_suite

    def broken(reply, reference, context=None):
        return 1 / 0

    monkeypatch.setitem(generation_suite.METRICS, "field_accuracy", broken)
    records = [{"id": "ok", "instruction": "q", "answer": json.dumps({"a": "1"})}]
    with pytest.raises(ZeroDivisionError):
        generation_suite.run_suite(records, _suite("field_accuracy"), _echo({"ok": '{"a": "1"}'}))
