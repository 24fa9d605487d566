"""The batch schema: one declaration of every column, one builder, one validator."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from cluster.engine import batch as B


def _rows(n: int = 4, **columns) -> dict:
    return {B.KEY: [f"k{i}" for i in range(n)], B.EPOCH: np.zeros(n, np.int64), B.SEED: np.arange(n),
            B.VALID: np.ones(n, bool), B.SKIP_REASON: [""] * n, B.LABEL: np.arange(n) % 3, **columns}


def test_build_casts_to_the_declared_dtypes_and_keeps_values():
    logits = torch.tensor([[0.5, -1.25, 3.0]] * 4)  # exactly representable in fp16
    batch = B.build(_rows(**{B.IMAGE: np.full((4, 8, 8, 3), 7, np.uint8), B.TEACHER_LOGITS: logits}))
    assert batch[B.TEACHER_LOGITS].dtype == np.float16 and batch[B.SEED].dtype == np.int64
    np.testing.assert_array_equal(batch[B.TEACHER_LOGITS].astype(np.float32), logits.numpy())
    assert batch[B.KEY].tolist() == ["k0", "k1", "k2", "k3"]
    B.validate(batch, needs=[B.IMAGE, B.TEACHER_LOGITS])


@pytest.mark.parametrize("columns, message", [
    ({"teacher_pid": np.zeros(4)}, "not in the schema"),
    ({B.IMAGE: np.zeros((4, 8, 8, 3), np.float32)}, "convert \\[0, 1\\] floats"),  # a cast would truncate
    ({B.IMAGE: np.zeros((4, 8, 8, 3), np.uint8), B.DAD_IMAGE: np.zeros((4, 8, 9, 3), np.uint8)}, "binds it to"),
    ({B.TEACHER_LOGITS: np.zeros((4, 10)), B.TARGET: np.zeros((4, 7))}, "binds it to"),  # one K per batch
    ({B.IMAGE: np.zeros((4, 8, 8), np.uint8)}, "row shape"),
    ({B.TEACHER_LOGITS: np.zeros((3, 10))}, "rows"),
])
def test_build_refuses_what_the_schema_does_not_allow(columns, message):
    with pytest.raises(ValueError, match=message):
        B.build(_rows(**columns))


def test_validate_names_missing_and_mistyped_columns():
    batch = B.build(_rows(**{B.IMAGE: np.zeros((4, 8, 8, 3), np.uint8)}))
    with pytest.raises(ValueError, match="lacks the columns \\['dad_image'\\]"):
        B.validate(batch, needs=[B.IMAGE, B.DAD_IMAGE])
    with pytest.raises(ValueError, match="'label' is float64"):
        B.validate({**batch, B.LABEL: batch[B.LABEL].astype(float)})


def test_tensors_and_row_bytes():
    image = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    x = B.images(image, "cpu")
    assert x.shape == (2, 3, 2, 2) and torch.equal(x[1, 2, 1, 0], torch.tensor(image[1, 1, 0, 2] / 255, dtype=torch.float32))
    soft = B.build(_rows(2, **{B.TARGET: np.full((2, 3), 1 / 3)}))
    assert B.targets(soft, "cpu").shape == (2, 3)
    assert B.targets({k: v for k, v in soft.items() if k != B.TARGET}, "cpu").dtype == torch.int64
    # one DAD row at 32 px with 10 classes: two uint8 images and two fp16 logit vectors
    row = {B.IMAGE: (32, 32, 3), B.DAD_IMAGE: (32, 32, 3), B.TEACHER_LOGITS: (10,), B.DAD_TEACHER_LOGITS: (10,)}
    assert B.nbytes(row) == 2 * 32 * 32 * 3 + 2 * 10 * 2


def test_read_only_columns_become_tensors_without_a_warning_and_with_their_values():
    # Ray Data hands the columns over from the object store read-only; torch warns on (and must never write to)
    # a tensor on such memory, so the column is copied: the tensor is writable and the column untouched
    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    x.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, labels = B.images(x, "cpu"), B.tensor({B.LABEL: x[:, 0, 0, 0]}, B.LABEL, "cpu")
    torch.testing.assert_close(images, torch.from_numpy(x.copy()).permute(0, 3, 1, 2).float() / 255)
    labels += 1
    assert labels.tolist() == [1, 49] and x[:, 0, 0, 0].tolist() == [0, 48]
