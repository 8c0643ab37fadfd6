"""Per-sample output functions of classifiers, as the attribution estimators take them
(``fn(output, target) -> [N]``, output the logits [N, C], target the labels [N])."""

import torch


def margin(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``logit_y - logsumexp_{k != y} logit_k`` = ``log(p_y / (1 - p_y))``: TRAK's model
    output function for classification (the log-odds of the correct class)."""
    logits = output.float() if output.dtype in (torch.float16, torch.bfloat16) else output
    y = target.reshape(-1, 1)
    correct = logits.gather(1, y)[:, 0]
    others = logits.scatter(1, y, float("-inf")).logsumexp(1)
    return correct - others


def negative_margin(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-margin``: a loss-like measurement (Kronfluence's classification example), so that
    positive influence scores mean the training sample raises the test sample's margin."""
    return -margin(output, target)


def one_minus_p(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - p_y`` (softmax probability of the target): TRAK's output-to-loss weighting for
    classification, ``d loss / d margin``."""
    return torch.sigmoid(-margin(output.detach(), target))  # 1 - p_y, the margin being its log-odds: no cancellation
