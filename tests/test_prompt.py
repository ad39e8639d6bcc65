"""The conversation template shared by training and runtime."""

from samf.runtime.inference.prompt import format_prompt, mcq_answer, mcq_choice_of, mcq_request


def test_mcq_round_trip():
    choices = ["left", "right", "both", "none"]
    assert format_prompt(mcq_request("Which side?", choices)) == (
        "Question: Which side? Choices: A. left. B. right. C. both. D. none. Answer:")
    assert mcq_answer("C", choices) == "C. both."
    assert mcq_choice_of(mcq_answer("C", choices)) == "C"
    assert mcq_choice_of("The answer is B. right.") == "B"
    assert mcq_choice_of("no idea") is None
    assert mcq_choice_of("a. lowercase") is None and mcq_choice_of("E. out of range") is None
    assert mcq_choice_of("AB. two letters") is None
    assert mcq_choice_of("D. none, not B. right") == "D"  # the first letter given


def test_prompt_has_no_special_tokens():
    p = format_prompt("Write the findings.")
    assert "<" not in p and "\n" not in p

