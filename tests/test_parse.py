import pytest

from grto_cli.core.answer import format_answer, parse_answer

SIZE = (64, 64)  # (height, width)


def test_valid_answer_with_and_without_think():
    text = '<think>left one</think><answer>{"bbox": [10, 12, 30, 40], "points": [[20, 25]]}</answer>'
    parsed = parse_answer(text, SIZE)
    assert parsed.status == "ok" and parsed.format_ok
    assert parsed.call.box == (10, 12, 30, 40)
    assert parsed.call.points == ((20, 25),)
    assert parse_answer(text, SIZE, require_think=True).format_ok
    bare = '<answer>{"bbox": [10, 12, 30, 40], "points": [[20, 25]]}</answer>'
    assert parse_answer(bare, SIZE).format_ok
    assert parse_answer(bare, SIZE, require_think=True).status == "no think block"


@pytest.mark.parametrize("text,status", [
    ("no tags at all", "no answer tag"),
    ('<answer>{"bbox": [1, 2, 3</answer>', "bad json"),
    ('<answer>[1, 2, 3, 4]</answer>', "answer is not an object"),
    ('<answer>{"bbox": [1, 2, 3]}</answer>', "bbox needs 4 numbers"),
    ('<answer>{"bbox": ["a", 2, 3, 4]}</answer>', "coordinate is not a number"),
    ('<answer>{"bbox": [true, 2, 3, 4]}</answer>', "coordinate is not a number"),
    ('<answer>{"points": [[1]]}</answer>', "point needs 2 numbers"),
    ('<answer>{"foo": 1}</answer>', "no bbox and no points"),
    ('<answer>{"bbox": [5, 5, 5, 9]}</answer>', "empty bbox inside the image"),
])
def test_malformed_answers_are_statuses_not_exceptions(text, status):
    parsed = parse_answer(text, SIZE)
    assert parsed.call is None and not parsed.format_ok
    assert parsed.status == status


def test_out_of_image_coordinates():
    # A box partly outside is clipped to the image; its corners are reordered.
    parsed = parse_answer('<answer>{"bbox": [70, -5, 50, 20]}</answer>', SIZE)
    assert parsed.call.box == (50, 0, 64, 20)
    # A box wholly outside has no area left.
    assert parse_answer('<answer>{"bbox": [70, 70, 90, 90]}</answer>', SIZE).status == "empty bbox inside the image"
    # A point outside the image is unusable (SAM would get a prompt off the image).
    assert parse_answer('<answer>{"bbox": [1, 1, 9, 9], "points": [[65, 3]]}</answer>', SIZE).status == "point outside the image"


def test_last_answer_block_wins_and_coordinate_conventions():
    text = '<answer>{"bbox": [0, 0, 1, 1]}</answer> then <answer>{"bbox": [500, 250, 1000, 500]}</answer>'
    rel = parse_answer(text, (200, 100), convention="relative1000")
    assert rel.call.box == (50, 50, 100, 100)
    # Absolute convention: coordinates live on the processor-resized image (here 2x smaller).
    absolute = parse_answer('<answer>{"bbox": [10, 10, 20, 30]}</answer>', (100, 100), resized_size=(50, 50))
    assert absolute.call.box == (20, 20, 40, 60)


def test_format_answer_round_trips_through_parser():
    text = format_answer([8, 16, 40, 48], [20.5, 30.5], (64, 128), (32, 64), "absolute")
    assert text == '<answer>{"bbox": [4, 8, 20, 24], "points": [[10, 15]]}</answer>'
    parsed = parse_answer(text, (64, 128), (32, 64))
    assert parsed.call.box == (8, 16, 40, 48)


def test_absolute_coordinates_scale_each_axis_by_its_own_resize():
    """Processor-resized 100x250 -> 32x96 (height x width): x scales by 250/96, y by 100/32."""
    text = '<answer>{"bbox": [48, 16, 96, 32], "points": [[24, 8]]}</answer>'
    parsed = parse_answer(text, (100, 250), (32, 96), "absolute")
    assert parsed.call.box == pytest.approx((125.0, 50.0, 250.0, 100.0))
    assert parsed.call.points[0] == pytest.approx((62.5, 25.0))
    assert format_answer((125.0, 50.0, 250.0, 100.0), (62.5, 25.0), (100, 250), (32, 96), "absolute") == text
