"""Every metric on hand-worked cases: right answers, near misses, malformed replies; RougeLsum
against Google's rouge-score on real GovReport summaries."""

import json
import os

import pytest
from fixtures import FIXTURES, needs_fixtures

from eval import exact_match, field_accuracy, finqa_accuracy, json_match, mcq_accuracy, rouge_lsum
from eval.metrics import METRICS, aggregate

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
    }
    scores = [mcq_accuracy.score(r, "C") for r in ("C.", "B.", "I think C")]
    assert aggregate(scores, bad_references=1) == {
        "score": pytest.approx(1 / 3),
        "num_examples": 3,
        "format_failures": 1,
        "bad_references": 1,
    }
