"""Weight schedules and step bounds (lib_tune.prompt.schedule)."""
import pytest

from lib_tune.prompt import Schedule, StepBound, TagError


def approx_list(values):
    return pytest.approx(values, abs=1e-12)


def test_constant():
    s = Schedule.parse("0.75")
    assert s.is_constant and s.value == 0.75 and s.to_text() == "0.75"
    assert [s.weight_at(i, 5) for i in range(5)] == [0.75] * 5
    assert Schedule.of(1).to_text() == "1"


def test_fraction_schedule_reaches_end_weight_on_last_step():
    s = Schedule.parse("0@0,1@1")
    assert s.curve(11) == approx_list([i / 10 for i in range(11)])


def test_half_way_ramp():
    s = Schedule.parse("0@0,1@0.5")  # fractions: 0 at step 0, 1 at step 10 of 21, then constant
    assert s.weight_at(0, 21) == 0 and s.weight_at(5, 21) == 0.5 and s.weight_at(10, 21) == 1
    assert s.weight_at(20, 21) == 1


@pytest.mark.parametrize("text,step,total,want", [
    # loractl's own expectations (test/tests.py, cheald/sd-webui-loractl)
    ("0.75@0;0.5@3;1@6", 0, 30, 0.75),
    ("0.75@0;0.5@3;1@6", 3, 30, 0.5),
    ("0.75@0;0.5@3;1@6", 6, 30, 1.0),
    ("0.75@0;0.5@3;1@6", 9, 30, 1.0),
    ("0.5@5,1.0@10", 0, 30, 0.5),
    ("0.5@5,1.0@10", 5, 30, 0.5),
    ("0.5@5,1.0@10", 8, 30, 0.8),
    ("0.5@5,1.0@10", 15, 30, 1.0),
    # loractl README: "0@5,1@6" stuffs the lora for the first 5 steps
    ("0@5,1@6", 5, 20, 0.0),
    ("0@5,1@6", 6, 20, 1.0),
    # unsorted keyframes are ordered by position
    ("1@10,0@0", 5, 30, 0.5),
    ("0.5@3,1@6,1@0", 0, 30, 1.0),
    ("0.5@3,1@6,1@0", 3, 30, 0.5),
    # percentages: always fractions; the other positions of such a schedule are steps
    ("0@0%,1@50%", 5, 21, 0.5),
    ("0@1,1@50%", 1, 21, 0.0),
    ("0@1,1@50%", 10, 21, 1.0),
    ("0@1,1@50%", 0, 21, 0.0),
    # a keyframe-free region before the first / after the last keyframe stays constant
    ("0.25@0.5,1@1", 0, 21, 0.25),
    ("0.25@0.5,1@1", 10, 21, 0.25),
    ("0.25@0.5,1@1", 15, 21, 0.625),
    # fractional step queries interpolate too
    ("0@0,1@10", 2.5, 30, 0.25),
])
def test_weight_at(text, step, total, want):
    assert Schedule.parse(text).weight_at(step, total) == pytest.approx(want, abs=1e-12)


def test_equal_positions_jump_to_the_last_written():
    s = Schedule.parse("0@0,0@0.5,1@0.5,1@1")
    assert s.weight_at(4, 11) == 0 and s.weight_at(5, 11) == 1 and s.weight_at(4.999, 11) == 0


def test_one_step_pass_does_not_divide_by_zero():
    s = Schedule.parse("0@0,1@1")
    assert s.weight_at(0, 1) == 1.0  # every fraction sits at step 0; the last keyframe applies there
    assert s.curve(0) == []


def test_is_constant_and_value():
    assert Schedule.parse("1@0,1@0.5").is_constant
    assert Schedule.parse("1@0,1@0.5").value == 1.0
    varying = Schedule.parse("0@0,1@1")
    assert not varying.is_constant
    with pytest.raises(ValueError, match="not constant"):
        varying.value


@pytest.mark.parametrize("text,canonical", [
    ("0@0,1@0.5", "0@0,1@0.5"),
    (" 0 @ 0 ; 1.0 @ 0.50 ", "0@0,1@0.5"),
    ("0~0,1~1", "0@0,1@1"),
    ("0@1,1@50%", "0@1,1@50%"),
    ("0@0,1@33.3%", "0@0,1@33.3%"),
    ("1@10,0@0", "1@10,0@0"),  # written order is kept (it decides ties)
    ("0.5@0,1@1,", "0.5@0,1@1"),  # a trailing separator is tolerated
    ("1e-1", "0.1"),
    ("-0.5@0,0.5@1", "-0.5@0,0.5@1"),
])
def test_text_round_trip(text, canonical):
    s = Schedule.parse(text)
    assert s.to_text() == canonical
    again = Schedule.parse(s.to_text())
    assert again == s
    assert again.curve(17) == s.curve(17)


@pytest.mark.parametrize("text,fragment", [
    ("", "weight is empty"),
    ("abc", "weight 'abc' is not a number"),
    (",", "has no keyframes"),
    ("1@", "keyframe position is empty"),
    ("@1", "keyframe weight is empty"),
    ("1@0,2", "keyframe '2' is not weight@position"),
    ("1@0@1", "is not weight@position"),
    ("1@-1", "is negative"),
    ("1@x%", "keyframe position 'x' is not a number"),
    ("0x10@1", "keyframe weight '0x10' is not a number"),
])
def test_bad_schedules(text, fragment):
    with pytest.raises(TagError) as info:
        Schedule.parse(text, "weight")
    assert fragment in str(info.value)


@pytest.mark.parametrize("text,fraction,at20,canonical", [
    ("5", False, 5.0, "5"),
    ("0", False, 0.0, "0"),
    ("1", False, 1.0, "1"),  # an integer is a step, as in LBW
    ("1.0", True, 20.0, "1.0"),  # a decimal in [0, 1] is a fraction of the pass
    ("0.5", True, 10.0, "0.5"),
    (".25", True, 5.0, "0.25"),
    ("50%", True, 10.0, "50%"),
    ("2.5", False, 2.5, "2.5"),  # a decimal above 1 is a step
    ("+3", False, 3.0, "3"),
])
def test_step_bounds(text, fraction, at20, canonical):
    b = StepBound.parse(text, "stop")
    assert b.fraction is fraction
    assert b.at(20) == at20
    assert b.to_text() == canonical
    assert StepBound.parse(b.to_text(), "stop") == b


@pytest.mark.parametrize("text,fragment", [("x", "start 'x' is not a number"), ("-1", "is negative"),
                                           ("", "start is empty"), ("%", "start is empty")])
def test_bad_step_bounds(text, fragment):
    with pytest.raises(TagError) as info:
        StepBound.parse(text, "start")
    assert fragment in str(info.value)
