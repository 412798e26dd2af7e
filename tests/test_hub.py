"""Pickle-free sharing of learners (`res2netplus.hub`): every task round-trips through a folder with the same
predictions; the Hub's download and upload paths run through huggingface_hub itself, offline."""
import hashlib, json
from functools import partial
import numpy as np
import pytest, torch
from PIL import Image
import huggingface_hub
from huggingface_hub import CommitOperationAdd, ModelCard
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import filter_repo_objects
from safetensors import safe_open
from safetensors.torch import save_file
from fastai.vision.all import ImageDataLoaders, Resize, PILImage, create_vision_model
from res2netplus.models import res2netplus50
from res2netplus.learner import res2netplus_learner
from res2netplus.segmentation import res2netplus_seg_learner
from res2netplus.detection import res2netplus_det_learner, make_detection_shapes, coco_dataloaders
from res2netplus.hub import (HUB_FILES, STALE_FILES, save_pretrained, from_pretrained, push_to_hub, model_state,
                             hub_config)
from conftest import tiny_plus

TINY = partial(res2netplus50, layers=(1, 1, 1, 1), base_width=8)
TINY_DET = dict(layers=(1, 1, 1, 1), out_channels=64, representation_size=256, min_size=64, max_size=64)

@pytest.fixture(scope='module')
def classifier(image_folder):
    "A tiny classifier on 40×48 crops (not square: the saved size keeps its order), fitted one short epoch"
    dls = ImageDataLoaders.from_folder(image_folder, valid='valid', bs=8, num_workers=0, seed=0,
                                       item_tfms=Resize((40, 48)))
    learn = res2netplus_learner(dls, TINY, mix=None, precision=None)
    learn.fit(1, 1e-3)
    return learn

def _image(tmp_path, size=(52, 60)):
    arr = np.random.default_rng(1).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path/'img.png')
    return tmp_path/'img.png'

def test_classifier_round_trip_and_files(classifier, image_folder, tmp_path):
    img = PILImage.create(image_folder/'valid'/'disc'/'0.png')
    folder = save_pretrained(classifier, tmp_path/'m', license='apache-2.0')  # before predict resets the recorder
    want = classifier.predict(img)
    got = from_pretrained(folder).predict(img)
    assert got[0] == want[0] and torch.allclose(got[2], want[2], atol=1e-5)
    assert {p.name for p in folder.iterdir()} == {'config.json', 'model.safetensors', 'README.md', 'loss.png'}
    cfg = json.loads((folder/'config.json').read_text())
    assert (cfg['task'], cfg['arch'], cfg['classes'], cfg['input']['size']) == ('classify', 'res2netplus50',
                                                                               ['disc', 'square'], [40, 48])
    assert cfg['arch_args'] == {'layers': [1, 1, 1, 1], 'base_width': 8}
    with safe_open(folder/'model.safetensors', 'pt') as f: assert f.metadata()['format'] == 'pt'
    card = ModelCard.load(folder/'README.md')
    assert card.data.library_name == 'res2netplus' and card.data.pipeline_tag == 'image-classification'
    assert 'accuracy' in card.text and '![loss.png](loss.png)' in card.text

@pytest.mark.parametrize('head', ['fpn', 'deeplabv3plus', 'unet'])
def test_segmentation_round_trip(seg_dls, head, tmp_path):
    learn = res2netplus_seg_learner(seg_dls, TINY, head=head, mix=None, precision=None, pretrained=False)
    img = _image(tmp_path)
    want = learn.predict(img)
    # the U-Net skips save_pretrained's own rebuild (a third U-Net, about 20 s): this round trip checks the same
    again = from_pretrained(save_pretrained(learn, tmp_path/'m', check=head != 'unet'))
    got = again.predict(img)
    assert torch.equal(got[0], want[0]) and torch.allclose(got[2], want[2], atol=1e-5)
    assert json.loads((tmp_path/'m'/'config.json').read_text())['classes'] == ['bg', 'fg']

@pytest.mark.parametrize('task,detector', [('detect', 'rcnn'), ('instance', 'cascade')])
def test_detection_round_trip(task, detector, tmp_path):
    data = make_detection_shapes(tmp_path/'s', n_images=4, size=64, seed=0)
    dls = coco_dataloaders(data/'images', data/'annotations.json', masks=task == 'instance', augs=None, bs=2)
    torch.manual_seed(0)
    learn = res2netplus_det_learner(dls, 'res2netplus50', task=task, detector=detector, **TINY_DET)
    with torch.no_grad():  # detections from random weights: give the classifier a say
        for p in learn.model.roi_heads.parameters(): p.add_(torch.randn_like(p) * 0.05)
    img = data/'images'/'0000.png'
    want = learn.predict(img, thresh=0.)
    again = from_pretrained(save_pretrained(learn, tmp_path/'m'))
    got = again.predict(img, thresh=0.)
    assert len(want['boxes']) and got['names'] == want['names']
    for k in ('boxes', 'scores') + (('masks',) if task == 'instance' else ()):
        torch.testing.assert_close(got[k], want[k])

def test_bad_input_names_the_fix(classifier, tmp_path):
    with pytest.raises(ValueError, match='No config.json'): from_pretrained(tmp_path)
    with pytest.raises(ValueError, match='is not a folder'): from_pretrained(tmp_path/'nowhere'/'else')
    folder = save_pretrained(classifier, tmp_path/'m')
    cfg = json.loads((folder/'config.json').read_text())
    (folder/'config.json').write_text(json.dumps({**cfg, 'arch': 'res2netplus51'}))
    with pytest.raises(ValueError, match="arch 'res2netplus51'.*upgrade res2netplus"): from_pretrained(folder)
    (folder/'config.json').write_text(json.dumps({**cfg, 'task': 'pose'}))
    with pytest.raises(ValueError, match="task 'pose'"): from_pretrained(folder)
    (folder/'config.json').write_text(json.dumps({**cfg, 'format': None}))
    with pytest.raises(ValueError, match='not a res2netplus learner config'): from_pretrained(folder)
    (folder/'config.json').write_text(json.dumps(cfg))
    save_file(model_state(create_vision_model(TINY, 5, pretrained=False)), folder/'model.safetensors')
    with pytest.raises(ValueError, match='does not fit the model.*keep the two files together'): from_pretrained(folder)
    # an arch config.json cannot name, and settings it cannot read off the learner, are asked for
    unnamed = res2netplus_learner(classifier.dls, tiny_plus, mix=None, precision=None)
    with pytest.raises(ValueError, match="arch='tiny_plus'.*pass arch="): save_pretrained(unnamed, tmp_path/'u')
    with pytest.raises(ValueError, match='arch_args='): save_pretrained(unnamed, tmp_path/'u', arch='res2netplus50')
    assert hub_config(unnamed, 'res2netplus50', dict(base_width=8))['arch_args'] == {'layers': [1, 1, 1, 1],
                                                                                    'base_width': 8}

def test_hub_paths_through_huggingface_hub_offline(classifier, image_folder, tmp_path, monkeypatch, caplog):
    """Download: `from_pretrained('user/repo', local_dir=...)` runs huggingface_hub's real `snapshot_download`, whose
    offline mode returns a local_dir already holding the repo. Upload: huggingface_hub 2.4.0 ships no fake Hub and no
    dry run of a commit (its own tests use a staging server), so we check what it does offer offline, and no stand-in
    of ours: (1) with `HF_HUB_OFFLINE` its request hook refuses the first request, before any socket, naming the
    endpoint: `push_to_hub` gets as far as `HfApi.create_repo`, after writing its folder, so a learner that cannot be
    shared fails before any network; (2) the files `upload_folder` would send are those its own `filter_repo_objects`
    keeps under `HUB_FILES`, none a pickle (`STALE_FILES`, which the commit deletes); (3) its `CommitOperationAdd`
    hashes them as the Hub would store them."""
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # huggingface_hub's own switch
    staged = save_pretrained(classifier, tmp_path/'user--repo')
    (staged/'stale.pkl').write_bytes(b'not sent')
    img = PILImage.create(image_folder/'valid'/'square'/'0.png')
    got = from_pretrained('user/repo', local_dir=staged).predict(img)
    assert 'Returning existing local_dir' in caplog.text  # huggingface_hub's snapshot_download answered, offline
    assert got[0] == classifier.predict(img)[0]
    with pytest.raises(OfflineModeIsEnabled, match='api/repos/create'): push_to_hub(classifier, 'user/repo')
    files = sorted(p.name for p in staged.iterdir())
    sent = list(filter_repo_objects(files, allow_patterns=HUB_FILES))
    assert sent == [f for f in files if f != 'stale.pkl']
    assert {'README.md', 'config.json', 'model.safetensors'} <= set(sent)
    assert not list(filter_repo_objects(sent, allow_patterns=STALE_FILES))
    op = CommitOperationAdd(path_in_repo='model.safetensors', path_or_fileobj=staged/'model.safetensors')
    assert op.upload_info.sha256.hex() == hashlib.sha256((staged/'model.safetensors').read_bytes()).hexdigest()
