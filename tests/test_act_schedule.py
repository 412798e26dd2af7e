"What res2netplus_learner does with ReLU-trained (Res2Net-v1b) weights in a Plus network: `pretrained_act`."
import pytest
from torch import nn
import safetensors.torch
from res2netplus.models import res2net50d, res2netplus50
from res2netplus.learner import res2netplus_learner
from res2netplus.act_schedule import MishSchedule, MishBlend, is_mish

@pytest.fixture(scope='module')
def v1b_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('w')/'res2net50d.safetensors'
    safetensors.torch.save_file(res2net50d().state_dict(), path)
    return path

def _acts(learn) -> dict:
    kinds = {}
    for m in learn.model[0].modules():  # the body: the head's ReLU is fastai's own
        if type(m) in (nn.ReLU, nn.Mish, MishBlend): kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
    return kinds

def _schedules(learn) -> list: return [cb for cb in learn.cbs if isinstance(cb, MishSchedule)]

def test_v1b_weights_keep_mish_by_default_and_get_the_ramp_when_asked(dls, v1b_file):
    "The ramp itself (ReLU while frozen, then to Mish, plain nn.Mish after) is tested in nbs/05c_act_schedule.ipynb"
    learn = res2netplus_learner(dls, 'res2netplus50', weights=v1b_file, mix=None)
    assert not _schedules(learn) and _acts(learn) == {'Mish': 19}  # 3 in the stem, one per block
    learn = res2netplus_learner(dls, 'res2netplus50', weights=v1b_file, mix=None, pretrained_act='schedule')
    assert len(_schedules(learn)) == 1 and _acts(learn) == {'Mish': 19}
    mine = MishSchedule(pct=0.5)
    learn = res2netplus_learner(dls, 'res2netplus50', weights=v1b_file, mix=None, cbs=[mine],
                                pretrained_act='schedule')
    assert _schedules(learn) == [mine]  # the user's own schedule, not a second one

def test_pretrained_act_relu_keeps_relu_and_mish_swaps_at_once(dls, v1b_file):
    relu = res2netplus_learner(dls, 'res2netplus50', weights=v1b_file, mix=None, pretrained_act='relu')
    assert _acts(relu) == {'ReLU': 19} and not _schedules(relu)
    mish = res2netplus_learner(dls, 'res2netplus50', weights=v1b_file, mix=None, pretrained_act='mish')
    assert _acts(mish) == {'Mish': 19} and not _schedules(mish)
    with pytest.raises(ValueError, match=r"pretrained_act must be 'schedule', 'relu' or 'mish', got 'gelu'"):
        res2netplus_learner(dls, 'res2netplus50', pretrained_act='gelu')

def test_weights_trained_with_mish_and_random_init_are_left_alone(dls, tmp_path):
    "A Plus checkpoint (trained with Mish) and a learner without weights get no ramp, even when one is asked for"
    safetensors.torch.save_file(res2netplus50().state_dict(), tmp_path/'plus.safetensors')
    plus = res2netplus_learner(dls, 'res2netplus50', weights=tmp_path/'plus.safetensors', mix=None,
                               pretrained_act='schedule')
    scratch = res2netplus_learner(dls, 'res2netplus50', mix=None, pretrained_act='relu')
    for learn in (plus, scratch): assert not _schedules(learn) and 'ReLU' not in _acts(learn)
    assert sum(map(is_mish, plus.model.modules())) == sum(map(is_mish, scratch.model.modules()))
