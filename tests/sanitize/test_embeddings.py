import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sanitize.data import open_dataset
from sanitize.density import row_chunks
from sanitize.embeddings import (
    Embeddings,
    GradientEmbedder,
    compute_embeddings,
    last_layer_gradient_factors,
    softmax_minus_onehot,
)
from sanitize.models import create_model


def _per_example_head_gradients(model, x, y):
    """Autograd's last-layer gradient, one example at a time: [dL/dW, dL/db] flattened."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([model.head.weight.grad, model.head.bias.grad[:, None]], dim=1).flatten())
    return torch.stack(rows)


def test_closed_form_last_layer_gradient_equals_autograd():
    torch.manual_seed(0)
    model = create_model("tiny", num_classes=5, in_shape=(3, 16, 16)).eval()
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    reference = _per_example_head_gradients(model, x, y)
    with torch.no_grad():
        features = model.features(x)
        g, f_tilde = last_layer_gradient_factors(features, model.head(features), y)
    exact = GradientEmbedder(5, model.feature_dim, sketch_dim=64, exact_max=10_000)
    assert exact.exact
    torch.testing.assert_close(exact(g, f_tilde), reference, rtol=1e-4, atol=1e-6)
    # norms and inner products factorise: no C x D vector is needed for them
    torch.testing.assert_close(g.norm(dim=1) * f_tilde.norm(dim=1), reference.norm(dim=1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close((g @ g.T) * (f_tilde @ f_tilde.T), reference @ reference.T, rtol=1e-4, atol=1e-6)


def test_sketch_inner_products_converge_to_the_true_ones():
    torch.manual_seed(1)
    g = torch.softmax(torch.randn(40, 50), 1) - F.one_hot(torch.randint(0, 50, (40,)), 50)
    f_tilde = torch.cat([torch.rand(40, 63), torch.ones(40, 1)], 1)
    full = (g[:, :, None] * f_tilde[:, None, :]).flatten(1)
    truth = full @ full.T
    errors = []
    for m in (64, 4096):
        sketch = GradientEmbedder(50, 63, sketch_dim=m, exact_max=0, seed=3)
        assert not sketch.exact and sketch.dim == m
        s = sketch(g, f_tilde)
        errors.append(float((s @ s.T - truth).norm() / truth.norm()))
    assert errors[1] < 0.25 * errors[0]  # error ~ 1/sqrt(m): 8x less for 64x the dimensions
    assert errors[1] < 0.2


def test_embedding_pass_writes_memmaps_and_resumes(tmp_path, digits_npz):
    dataset = open_dataset(digits_npz)
    torch.manual_seed(0)
    model = create_model("tiny", dataset.num_classes, (3, 16, 16))
    args = dict(device=torch.device("cpu"), amp_dtype=None, batch_size=256, signature="s")
    first = compute_embeddings(model, dataset, tmp_path / "emb", **args)
    assert first.features.shape == (len(dataset), model.feature_dim)
    assert first.gradient.shape == (len(dataset), 10 * (model.feature_dim + 1))
    reference = np.array(first.gradient)
    # simulate a kill after the first 512 rows: damage the rest and rewind the progress marker
    writable = np.load(tmp_path / "emb" / "gradient.npy", mmap_mode="r+")
    writable[512:] = 0
    writable.flush()
    (tmp_path / "emb" / "progress.json").write_text('{"rows_done": 512}')
    resumed = compute_embeddings(model, dataset, tmp_path / "emb", **args)
    np.testing.assert_array_equal(np.array(resumed.gradient), reference)


def test_proxy_statistics_read_in_chunks_match_the_loss_and_softmax_of_the_whole(tmp_path):
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=(1000, 7)) * 4).astype(np.float32)
    labels = rng.integers(0, 7, 1000)
    np.save(tmp_path / "logits.npy", logits)
    embeddings = Embeddings(
        tmp_path,
        features=np.zeros((1000, 2), np.float32),
        logits=np.load(tmp_path / "logits.npy", mmap_mode="r"),
        gradient=np.zeros((1000, 2), np.float32),
        labels=labels,
        meta={},
    )
    budget = 64 * logits.shape[1] * 8  # 64 rows of float64 a chunk: the last chunk is a partial one
    loss, predicted, confidence = embeddings.proxy_statistics(budget=budget)
    expected_loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), reduction="none").numpy()
    probabilities = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(predicted, probabilities.argmax(axis=1))
    np.testing.assert_allclose(confidence, probabilities.max(axis=1), rtol=1e-6)
    assert embeddings.accuracy(budget=budget) == pytest.approx((probabilities.argmax(axis=1) == labels).mean())


def test_logit_gradient_is_written_in_chunks_memory_mapped_and_dropped_when_the_pass_is_redone(tmp_path, digits_npz):
    dataset = open_dataset(digits_npz)
    torch.manual_seed(0)
    model = create_model("tiny", dataset.num_classes, (3, 16, 16))
    args = dict(device=torch.device("cpu"), amp_dtype=None, batch_size=256)
    embeddings = compute_embeddings(model, dataset, tmp_path / "emb", signature="a", **args)
    expected = softmax_minus_onehot(np.array(embeddings.logits), dataset.labels)
    budget = 100 * dataset.num_classes * 8  # 100 rows a chunk: several chunks, the last a partial one
    first = embeddings.logit_gradient(budget=budget)
    assert isinstance(first, np.memmap) and not first.flags.writeable
    np.testing.assert_array_equal(np.array(first), expected)
    assert sorted(p.name for p in (tmp_path / "emb").glob("logit_gradient*")) == ["logit_gradient.npy"]
    np.testing.assert_array_equal(np.array(embeddings.logit_gradient()), expected)  # read back, not recomputed
    torch.manual_seed(1)
    other = create_model("tiny", dataset.num_classes, (3, 16, 16))
    redone = compute_embeddings(other, dataset, tmp_path / "emb", signature="b", **args)
    assert not (tmp_path / "emb" / "logit_gradient.npy").exists()  # stale: it belonged to the other proxy's logits
    np.testing.assert_array_equal(
        np.array(redone.logit_gradient()), softmax_minus_onehot(np.array(redone.logits), dataset.labels)
    )


def test_row_chunks_cover_every_row_once_within_the_budget():
    for n, row_bytes, budget in [(1000, 8000, 64_000), (7, 10, 1), (0, 4, 100), (5, 4, 10**9)]:
        chunks = row_chunks(n, row_bytes, budget)
        assert np.array_equal(np.concatenate([np.arange(n)[c] for c in chunks] or [[]]), np.arange(n))
        assert all((c.stop - c.start) * row_bytes <= max(budget, row_bytes) for c in chunks)
