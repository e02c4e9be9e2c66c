"""Scorers on hand-made predictions: right, wrong, partial and with extra text."""
from __future__ import annotations

import pytest

from tca_attention.eval.scorers import SCORERS, occurs, score


def test_registry_holds_the_ruler_style_scorers() -> None:
    assert set(SCORERS.names()) >= {"exact", "contains", "any", "recall"}
    with pytest.raises(KeyError, match="unknown scorer"):
        SCORERS.get("bleu")


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("4817203", 1.0),  # right, bare
        (" 4817203.", 1.0),  # right, punctuation
        ("The magic number is 4817203, as stated.", 1.0),  # extra text is fine
        ("4817204", 0.0),  # wrong
        ("48172031", 0.0),  # a longer number is not the answer
        ("", 0.0),
    ],
)
def test_contains_single_answer(prediction: str, expected: float) -> None:
    assert score("contains", prediction, ["4817203"]) == expected


def test_contains_needs_every_answer_and_recall_gives_partial_credit() -> None:
    answers = ["1111111", "2222222", "3333333", "4444444"]
    partial = "1111111, 3333333 and 9999999"
    assert score("contains", partial, answers) == 0.0
    assert score("recall", partial, answers) == 0.5
    assert score("any", partial, answers) == 1.0
    everything = "They are 4444444, 3333333, 2222222, 1111111 and also 5555555."
    assert score("contains", everything, answers) == 1.0
    assert score("recall", everything, answers) == 1.0
    assert score("recall", "none of them", answers) == 0.0
    assert score("recall", "whatever", []) == 0.0


def test_matching_is_case_insensitive_and_whole_word() -> None:
    assert occurs("Marrowby", "it was MARROWBY.")
    assert not occurs("page", "the pages were numbered")  # not a word of the prediction
    assert occurs("Adela Hawthorne", "founded by adela   hawthorne in 1873")
    assert not occurs("", "anything")
    words = ["page", "tight", "hand"]
    assert score("recall", "1. pages 2. tight 3. handy", words) == pytest.approx(1 / 3)


def test_exact_takes_the_first_line_only() -> None:
    assert score("exact", "Marrowby.\nMore text", ["marrowby"]) == 1.0
    assert score("exact", "In Marrowby.", ["marrowby"]) == 0.0  # extra text fails exact
    assert score("exact", "", ["x"]) == 0.0
