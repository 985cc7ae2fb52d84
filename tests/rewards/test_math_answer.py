"""steadyrl.rewards.builtin:math_answer on GSM8K's own answers: a worked solution ending in '#### <number>' works
as the gold answer as it is (math-verify reads its last number), which the GSM8K recipe
(configs/models/qwen2.5-0.5b-instruct-gsm8k.yaml) relies on.

Run: .venv/bin/python -m pytest -q tests/rewards/test_math_answer.py
"""

from __future__ import annotations

import pytest

from extras import needs_tasks_extra_math
from steadyrl.rewards.builtin import math_answer

pytestmark = needs_tasks_extra_math
GSM8K = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize(
    ("answer", "completion", "expected"),
    [
        (GSM8K, "48 + 24 = 72, so the answer is \\boxed{72}.", 1.0),
        (GSM8K, "She sold 72 clips", 1.0),  # boxed_or_last: the completion's last number
        (GSM8K, "\\boxed{72.0}", 1.0),  # math-verify equivalence
        (GSM8K, "\\boxed{24}", 0.0),  # a number of the solution that is not its answer
        (GSM8K, "no number here", 0.0),
        ("Each costs $5, so 8 cost 8*$5 = $<<8*5=40>>40.\n#### 40", "\\boxed{40}", 1.0),  # dollar signs in the text
        ("The loss is 3 - 10 = -7 dollars.\n#### -7", "\\boxed{-7}", 1.0),
        ("He pays 1,000 + 234 = <<1000+234=1234>>1,234 dollars.\n#### 1234", "\\boxed{1234}", 1.0),
        ("He pays 1,000 + 234 = <<1000+234=1234>>1,234 dollars.\n#### 1234", "\\boxed{234}", 0.0),
    ],
)
def test_gsm8k_solutions_are_gold_answers_as_they_are(answer, completion, expected):
    assert math_answer({"answer": answer}, completion) == expected
