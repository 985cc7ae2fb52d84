"""Your reward function: loaded from a file or a module by name, called in this process or in a worker pool.

A reward function has the signature (docs/your-own-model.md)::

    def my_reward(record: dict, completion: str, **reward_kwargs) -> float | None | dict[str, float | None]

``record`` is the data row of the prompt (every field of the row, plus ``id``, ``prompt`` and ``answer``);
``completion`` is the decoded text the policy wrote after the prompt. Return a float, None / NaN when the
completion cannot be scored, or a dict of named floats for several rewards at once (multi-reward). This
package imports only the standard library, so that pool workers start without torch.
"""

from steadyrl.rewards.functions import (
    RewardFunctionError,
    check_reward_signature,
    load_reward_function,
    reward_spec_of,
    to_reward_value,
)
from steadyrl.rewards.pool import CallFailed, CallTimedOut, RewardPool

__all__ = [
    "CallFailed",
    "CallTimedOut",
    "RewardFunctionError",
    "RewardPool",
    "check_reward_signature",
    "load_reward_function",
    "reward_spec_of",
    "to_reward_value",
]
