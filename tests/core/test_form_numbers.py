"""A number field's value is a finite number within 64 bits, whatever surface it came through, and
a number typed by a person reads as JSON writes numbers (``form_number``): exact integers."""

from __future__ import annotations

import math

import pytest

from svantic_grpc.core.errors import InvalidArgument
from svantic_grpc.core.inputs.checks import checked_resolution, form_number
from svantic_grpc.core.inputs.model import Form, FormField, InputKind, InputRequest, Resolution


@pytest.mark.parametrize(
    ("typed", "value"),
    [("3", 3), (" -12 ", -12), ("9007199254740993", 9007199254740993), ("2.5", 2.5), ("1e3", 1000.0)],
)
def test_typed_numbers_read_as_json_writes_them(typed: str, value: int | float) -> None:
    read = form_number(typed)
    assert read == value and type(read) is type(value)


@pytest.mark.parametrize("typed", ["1e400", "inf", "nan", "12abc", "0x10", "1_000", "", "+", "9" * 20])
def test_what_is_no_finite_64_bit_number_is_refused(typed: str) -> None:
    with pytest.raises(ValueError):
        form_number(typed)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 2**64, True])
def test_a_form_answer_with_a_number_json_cannot_hold_is_refused_naming_the_field(value: object) -> None:
    form = Form(title="Export", fields=(FormField("rows", "number", "Rows"),))
    request = InputRequest("acme", "inp_1", "ses_1", "msg_1", InputKind.FORM, 0.0, 60.0, form=form)
    with pytest.raises(InvalidArgument) as refused:
        checked_resolution(request, Resolution(values={"rows": value}))
    assert refused.value.field == "resolution.values.rows"
    assert checked_resolution(request, Resolution(values={"rows": 2**63 - 1})).values == {"rows": 2**63 - 1}
