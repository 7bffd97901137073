"""The parameter types every vision notebook shares: one-line errors naming what is allowed."""

import pytest
from pydantic import BaseModel, ValidationError

from salience.experiments.vision_params import ImageSize, KeepRatios, PhotoNames


class _P(BaseModel):
    image_size: ImageSize = 112
    keeps: KeepRatios = [0.5]
    photos: PhotoNames = ["astronaut"]


def test_values_are_normalised():
    p = _P(keeps=[0.1, 0.5, 0.1])
    assert p.keeps == [0.5, 0.1]


@pytest.mark.parametrize("values, needle", [
    ({"image_size": 100}, "multiple of the patch size 14"),
    ({"image_size": 0}, "greater than or equal to 14"),
    ({"keeps": [0.0, 0.5]}, r"ratio in \(0, 1\]"),
    ({"keeps": [1.5]}, r"ratio in \(0, 1\]"),
    ({"keeps": []}, "at least 1"),
    ({"photos": ["nope"]}, "choices: .*astronaut"),
])
def test_bad_values_name_the_valid_range(values, needle):
    with pytest.raises(ValidationError, match=needle):
        _P(**values)
