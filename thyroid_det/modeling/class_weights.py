"""Per-class weights of a classification loss, as Ec's (MODEL.SSD.CLASS_WEIGHTS) and the
refiner's (MODEL.REFINER.CLASS_WEIGHTS) take them: TN5000's training nodules are 70% malignant,
and a weight on benign is the simplest way to make both classes count."""
import math
from typing import Sequence, Tuple

__all__ = ["check_class_weights"]


def check_class_weights(
    class_weights: Sequence[float], num_classes: int, key: str = "MODEL.SSD.CLASS_WEIGHTS"
) -> Tuple[float, ...]:
    """``class_weights`` as floats: none, or one finite positive weight per foreground class
    (a zero or negative weight would silence or invert a class's loss). ``key`` names the
    config key in the error."""
    weights = tuple(float(w) for w in class_weights)
    if weights and len(weights) != num_classes:
        raise ValueError(
            f"{key} {list(weights)}: expected one weight per foreground class "
            f"({num_classes}) or none"
        )
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"{key} {list(weights)}: every weight must be finite and > 0")
    return weights
