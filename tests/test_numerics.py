"Numerical safety: mixed precision (fp16 and bf16 autocast) on inputs of extreme range gives finite outputs, gradients"
import pytest, torch
from res2netplus.models import res2netplus50, res2net50d

@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    return {'res2netplus50': res2netplus50(n_out=10), 'res2net50d': res2net50d(n_out=10)}

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('arch', ['res2netplus50', 'res2net50d'])
def test_autocast_training_step_stays_finite_on_extreme_inputs(models, arch, dtype):
    "Unnormalised pixels (0–255), large values (±1e4) and a constant image: the loss and every gradient are finite"
    m = models[arch].train()
    for x in (torch.rand(2, 3, 64, 64)*255, torch.randn(2, 3, 64, 64)*1e4, torch.full((2, 3, 64, 64), 7.)):
        m.zero_grad()
        with torch.autocast('cpu', dtype=dtype):
            loss = torch.nn.functional.cross_entropy(m(x).float(), torch.tensor([1, 2]))
        loss.backward()
        assert torch.isfinite(loss), (arch, dtype, x.abs().max())
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None), (arch, dtype)

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_inference_matches_float32(models, dtype):
    "In eval mode, autocast logits are finite and close to float32's for normalised inputs"
    m = models['res2netplus50'].eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast('cpu', dtype=dtype): low = m(x).float()
    assert torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max() + 0.05, (low - ref).abs().max()
