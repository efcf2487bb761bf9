"""Final-answer extraction (dlmom.answers): numbers written one way, the order of the rules, the fallback
to the last line. Items are made up here, not taken from any benchmark."""
import pytest

from dlmom.answers import final_answer, final_number, normalise_line, numbers


@pytest.mark.parametrize("text, expected", [
    # the last number when nothing marks the answer
    ("First 3 apples, then 4 more: 7", "7"),
    ("So she pays 12 dollars.", "12"),
    ("There were 1,234,567 people", "1234567"),
    ("It costs $1,250.50 in total.", "1250.5"),
    ("The temperature fell to -4 degrees", "-4"),
    ("The temperature fell to \u22124 degrees", "-4"),
    ("Subtract: 10-3", "3"),
    ("2+3", "3"),
    ("a ratio of .75", "0.75"),
    ("12.00", "12"),
    ("007 agents", "7"),
    ("-0", "0"),
    ("+8 points", "8"),
    ("she ate 3/4 of it", "3/4"),
    ("lists 1,2,3", "3"),
    ("He was 5.", "5"),
    ("It grew 40%.", "40"),
    # markers: \boxed, ####, "answer is"
    ("We get 5 then 6, so \\boxed{42}. Check: 42 - 6 = 36", "42"),
    ("\\boxed{1} at first, finally \\boxed{x = 2,000}", "2000"),
    ("\\boxed{\\frac{3}{4}}", "3/4"),
    ("\\boxed{\\dfrac{10}{4}} hmm", "10/4"),
    ("\\boxed{{12}}", "12"),
    ("\\boxed{no number} but 9 later", "9"),
    ("\\boxed{7", "7"),
    ("Work: 3 + 4 = 7\n#### 7\nThen 99 more words 100", "7"),
    ("#### 1,024", "1024"),
    ("The answer is 18. Because 9 * 2 = 18 and 3 more is 21", "18"),
    ("the final answer is: -2.50 and not 3", "-2.5"),
    ("Answer: 64\nExplanation: 8 * 8 and 65 is wrong", "64"),
    ("The answer is 5. Wait, no. The answer is 6, since 2 * 3 = 6 and 7 is wrong", "6"),
    ("The answer is unclear, maybe 11", "11"),
])
def test_final_number(text, expected):
    assert final_number(text) == expected


@pytest.mark.parametrize("text", ["", "no digits here", "x2 and v1.2 are names", "the 5th item", "10am"])
def test_final_number_none(text):
    assert final_number(text) is None


def test_numbers_in_order():
    assert numbers("1,000 then 2.50 then -3 then 4/8") == ["1000", "2.5", "-3", "4/8"]


def test_final_answer_falls_back_to_the_last_line():
    assert final_answer("Let me think.\n\n**Paris.**\n  ") == "paris"
    assert final_answer("Answer: blue\n") == "answer: blue"
    assert final_answer("Lots of 3 and 4\nlast line words") == "4"
    assert final_answer("  \n \n") is None
    assert normalise_line("  The   ANSWER:  `Yes`!  ") == "the answer: yes"


def test_bad_text():
    with pytest.raises(ValueError, match="final_number: text must be a string, got int"):
        final_number(5)
