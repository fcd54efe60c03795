import os

import numpy as np
import torch

from cicl.config import AugmentConfig, ModelConfig, ReferenceEncoderConfig, TransformerConfig
from cicl.model.augment import augment
from cicl.model.modules import (
    CICLModel,
    GeneModuleTransformer,
    ReferenceEncoder,
    balanced_gene_groups,
)


def _groups(g=40, t=5):
    rng = np.random.default_rng(0)
    return balanced_gene_groups(rng.normal(size=(g, 6)), t)


def test_gene_groups_are_balanced_partition():
    idx = _groups(43, 5)
    members = idx[idx < 43]
    assert sorted(members.tolist()) == list(range(43))
    sizes = (idx < 43).sum(1)
    assert sizes.max() - sizes.min() <= 1 or sizes.max() == idx.shape[1]
    assert idx.shape == (5, 9)


def test_transformer_attention_is_live():
    """Unlike a single-token 'Transformer', Q/K receive gradient and tokens interact."""
    tc = TransformerConfig(n_tokens=5, d_model=16, n_heads=2, ffn_dim=32, dropout=0.0)
    cfg = ModelConfig(embed_dim=8, transformer=tc)
    enc = GeneModuleTransformer(40, _groups(), cfg)
    x = torch.randn(16, 40)
    enc(x).pow(2).sum().backward()
    attn = enc.blocks.layers[0].self_attn
    d = tc.d_model
    gq = attn.in_proj_weight.grad[:d].abs().sum()
    gk = attn.in_proj_weight.grad[d : 2 * d].abs().sum()
    assert gq > 0 and gk > 0


def test_transformer_output_depends_on_other_modules_through_attention():
    tc = TransformerConfig(n_tokens=5, d_model=16, n_heads=2, ffn_dim=32, dropout=0.0)
    cfg = ModelConfig(embed_dim=8, transformer=tc)
    enc = GeneModuleTransformer(40, _groups(), cfg).eval()
    x = torch.randn(4, 40)
    y0 = enc(x)
    x2 = x.clone()
    genes = enc.groups[3][enc.groups[3] < 40]
    x2[:, genes] += 3.0  # change one module only
    assert (enc(x2) - y0).abs().max() > 1e-4


def test_reference_encoder_keeps_gene_width():
    cfg = ModelConfig(encoder="reference", reference=ReferenceEncoderConfig(layers=2, hidden=32))
    enc = ReferenceEncoder(24, cfg)
    assert enc(torch.randn(3, 24)).shape == (3, 24)
    m = CICLModel(24, cfg)
    h, z, rec = m(torch.randn(3, 24))
    assert h.shape == (3, 24) and z.shape == (3, cfg.proj_dim) and rec is None
    # a decoder reads the encoder's width (here the gene count), one output per gene
    _, _, rec = CICLModel(24, cfg, recon="nb").eval()(torch.randn(3, 24))
    assert rec.shape == (3, 24)


def test_default_mlp_encoder_and_decoder_shapes():
    cfg = ModelConfig()
    assert cfg.encoder == "mlp" and cfg.batch_norm
    m = CICLModel(40, cfg, recon="nb")
    h, z, rec = m(torch.randn(16, 40))
    assert h.shape == (16, cfg.embed_dim) and rec.shape == (16, 40)
    assert m.decoder.log_theta.shape == (40,)
    assert CICLModel(40, cfg, recon="gaussian").decoder.log_theta is None
    kinds = [type(mod).__name__ for mod in m.encoder.net]
    assert kinds.count("BatchNorm1d") == 2 and kinds[-1] == "Linear"  # linear embedding


def test_augment_is_seeded_and_resampled():
    x = torch.randn(32, 50)
    nbr = torch.randn(32, 50)
    cfg = AugmentConfig()
    a1 = augment(x, nbr, cfg, torch.Generator().manual_seed(0))
    a2 = augment(x, nbr, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(a1, a2)
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(augment(x, nbr, cfg, g), augment(x, nbr, cfg, g))


def test_augment_strengths():
    x = torch.ones(200, 100)
    g = torch.Generator().manual_seed(1)
    masked = augment(x, None, AugmentConfig(noise_std=0.0, mask_frac=0.3, neighbor_prob=0.0), g)
    assert abs(float((masked == 0).float().mean()) - 0.3) < 0.02
    noisy = augment(
        x, None, AugmentConfig(noise_std=0.5, noise_frac=1.0, mask_frac=0.0, neighbor_prob=0.0), g
    )
    assert abs(float((noisy - x).std()) - 0.5) < 0.02
    nbr = torch.zeros(200, 100)
    mixed = augment(
        x, nbr, AugmentConfig(noise_std=0.0, mask_frac=0.0, neighbor_prob=1.0, neighbor_mix=0.25), g
    )
    assert torch.allclose(mixed, torch.full_like(x, 0.75))


def test_token_readout_reads_every_module_after_attention():
    """``readout="tokens"``: the embedding is a linear map of all module tokens (no CLS pooling
    bottleneck), and attention still mixes modules before it (Q/K get gradient)."""
    tc = TransformerConfig(
        n_tokens=5, d_model=16, n_heads=2, ffn_dim=32, dropout=0.0, readout="tokens"
    )
    cfg = ModelConfig(embed_dim=8, transformer=tc)
    enc = GeneModuleTransformer(40, _groups(), cfg)
    assert enc.out.in_features == 5 * 16
    x = torch.randn(16, 40)
    out = enc(x)
    assert out.shape == (16, 8)
    out.pow(2).sum().backward()
    gq = enc.blocks.layers[0].self_attn.in_proj_weight.grad[:16].abs().sum()
    assert gq > 0


def test_training_does_not_depend_on_the_thread_count(tiny_cfg):
    """torch's CPU BatchNorm kernel splits its sums by thread (on treutlein, seed 0, the
    embeddings at 1 and 2 threads differed by up to 0.033); the BatchNorm training uses on CPU
    does not, so a seed gives the same weights and labels at any thread count. On AVX-512
    hosts this holds only with torch's kernels pinned to their AVX2 path (``cicl._cpu``)."""
    from cicl.data.preprocess import preprocess
    from cicl.data.synthetic import synthetic_adata
    from cicl.train.loop import train

    a = synthetic_adata(n_cells=300, n_genes=200, n_clusters=3, seed=2)
    prep = preprocess(a, tiny_cfg.preprocess)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(train(prep.x, prep.pcs, 3, tiny_cfg, counts=prep.counts, progress=False))
    finally:
        torch.set_num_threads(before)
    assert runs[0].threads == 1 and runs[1].threads == 2
    assert np.array_equal(runs[0].embedding, runs[1].embedding)
    assert np.array_equal(runs[0].labels, runs[1].labels)


def test_import_cicl_pins_the_cpu_kernels_on_x86():
    """``import cicl`` before torch runs torch's AVX2 kernels on any x86 host with AVX2 (an
    AVX-512 host included), so thread counts and hosts agree; elsewhere it changes nothing."""
    import subprocess
    import sys

    from cicl._cpu import kernel_env

    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    code = "import cicl, torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()
    if kernel_env():
        assert out == "AVX2"
        assert torch.backends.cpu.get_cpu_capability() == "AVX2"  # this process: conftest


def test_kernel_pin_only_where_the_cpu_has_avx2(monkeypatch):
    from cicl import _cpu

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(_cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(_cpu, "_cpu_flags", lambda: {"sse2", "avx"})
    assert _cpu.kernel_env() == {}
    monkeypatch.setattr(_cpu, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert _cpu.kernel_env()["ATEN_CPU_CAPABILITY"] == "avx2"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # the user's choice is kept
    assert _cpu.kernel_env()["ATEN_CPU_CAPABILITY"] == "default"
    monkeypatch.setattr(_cpu.platform, "machine", lambda: "aarch64")
    assert _cpu.kernel_env() == {}
