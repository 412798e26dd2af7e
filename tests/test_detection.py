"Detection: backbones, factories, COCO/VOC data, augmentation, COCO evaluation, one short fit through `train_detection`"
import csv, json, math
import numpy as np
import pytest, torch
from torch import nn
import albumentations as A
from PIL import Image
from res2netplus.detection import *
from res2netplus.detection import _segm_to_mask
from res2netplus.models import res2net50d, res2netplus50
from torchvision.models.detection import FasterRCNN, MaskRCNN

TINY = dict(layers=(1, 1, 1, 1), out_channels=64, representation_size=256, box_batch_size_per_image=128,
            rpn_batch_size_per_image=128)

@pytest.mark.parametrize('arch', ['res2net50_26w_4s', 'res2net50d', 'res2netplus50', res2netplus50])
def test_backbone_levels(arch):
    bb = res2net_fpn_backbone(arch, layers=(1, 1, 1, 1))
    feats = bb(torch.randn(1, 3, 128, 128))
    assert list(feats) == ['0', '1', '2', '3', 'pool'] and bb.strides == [4, 8, 16, 32, 64]
    assert [f.shape[1] for f in feats.values()] == [256] * 5
    assert [f.shape[-1] for f in feats.values()] == [32, 16, 8, 4, 2]
    assert [b[0].in_channels for b in bb.fpn.inner_blocks] == [256, 512, 1024, 2048]

def test_returned_layers_set_anchors_and_roi_levels():
    model = fasterrcnn_res2net_fpn('res2net50d', num_classes=3, returned_layers=(2, 3, 4), min_size=128, max_size=128,
                                   **TINY)
    assert model.backbone.strides == [8, 16, 32, 64]
    assert model.rpn.anchor_generator.sizes == ((64,), (128,), (256,), (512,))
    assert model.roi_heads.box_roi_pool.featmap_names == ['0', '1', '2']
    with torch.no_grad(): out = model.eval()([torch.rand(3, 128, 128)])
    assert set(out[0]) == {'boxes', 'labels', 'scores'}

def test_weights_file_and_frozen_stages(tmp_path):
    "A local checkpoint loads into the backbone; frozen stages hold no trainable parameter and no BatchNorm"
    import safetensors.torch
    net = res2net50d(layers=(1, 1, 1, 1))
    with torch.no_grad():
        for p in net.parameters(): p.add_(torch.randn_like(p) * 0.01)
    safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path/'w.safetensors')
    # the defaults with weights: 3 trainable stages, frozen BatchNorm
    bb = res2net_fpn_backbone('res2net50d', weights=tmp_path/'w.safetensors', layers=(1, 1, 1, 1))
    sd = net.state_dict()
    for k, v in bb.body.state_dict().items():
        if k in sd and not k.endswith('num_batches_tracked'): torch.testing.assert_close(v, sd[k])
    assert {n.split('.')[0] for n, p in bb.body.named_parameters() if p.requires_grad} == {'layer2', 'layer3', 'layer4'}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.body.modules())
    with pytest.warns(UserWarning, match="norm='bn'"):
        res2net_fpn_backbone('res2net50d', norm='frozen', layers=(1, 1, 1, 1))

def test_reference_structure_r2_101():
    """The published R2-101-FPN backbone: 3-4-23-3 blocks, C2–C5 at 256–2048 channels, the body's parameters those of
    res2net101d without its classifier"""
    model = fasterrcnn_res2net101d_fpn(num_classes=81)
    body = model.backbone.body
    assert [len(body[f'layer{k}']) for k in range(1, 5)] == [3, 4, 23, 3]
    assert [b[0].in_channels for b in model.backbone.fpn.inner_blocks] == [256, 512, 1024, 2048]
    from res2netplus.models import res2net101d
    ref = res2net101d()
    n_ref = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith('fc.'))
    assert sum(p.numel() for p in body.parameters()) == n_ref
    assert isinstance(model, FasterRCNN) and model.roi_heads.box_predictor.cls_score.out_features == 81

@pytest.mark.parametrize('factory', [fasterrcnn_res2netplus50_fpn, maskrcnn_res2netplus50_fpn,
                                     fasterrcnn_res2net101d_fpn, maskrcnn_res2net101d_fpn,
                                     fasterrcnn_res2netplus101_fpn, maskrcnn_res2netplus101_fpn])
def test_named_factories_train_and_eval(factory):
    torch.manual_seed(0)
    model = factory(num_classes=3, min_size=96, max_size=96, **TINY)
    masked = isinstance(model, MaskRCNN)
    img = torch.rand(3, 96, 96)
    m = torch.zeros(1, 96, 96, dtype=torch.uint8); m[0, 10:50, 20:70] = 1
    t = dict(boxes=torch.tensor([[20., 10., 70., 50.]]), labels=torch.tensor([1]), **({'masks': m} if masked else {}))
    losses = model.train()([img], [t])
    assert set(losses) == set(loss_names(model)) and all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad(): out = model.eval()([img])[0]
    assert ('masks' in out) == masked

def _colour_masks(img:np.ndarray) -> dict:
    "Where each class's colour is in a shapes image (background noise stays below 100 in every channel)"
    return {1: img[..., 0] > 140, 2: img[..., 1] > 140, 3: img[..., 2] > 140}

def test_coco_polygons_and_rle_match_the_drawing(tmp_path):
    path = make_detection_shapes(tmp_path/'s', n_images=10, size=(80, 112), seed=3)
    ann = json.loads((path/'annotations.json').read_text())
    kinds = {type(a['segmentation']).__name__ for a in ann['annotations']}
    assert kinds == {'dict', 'list'}  # RLE circles and polygon squares/triangles
    records, classes, cat_ids = coco_detection_items(path/'images', path/'annotations.json')
    ds = DetectionDataset(records, classes, with_masks=True)
    n_empty = 0
    for i in range(len(ds)):
        img, t = ds[i]
        pixels = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert img.shape == (3, 80, 112) and t['masks'].shape == (len(t['labels']), 80, 112)
        for k, where in _colour_masks(pixels).items():
            drawn = np.zeros((80, 112), bool)
            if (t['labels'] == k).any(): drawn = t['masks'][t['labels'] == k].sum(0).numpy() > 0
            assert (drawn == where).all(), (i, k)
        assert (boxes_from_masks(t['masks'].numpy()) == t['boxes'].numpy()).all()
        n_empty += len(t['labels']) == 0
    assert n_empty >= 2

def test_segmentation_formats():
    h, w = 20, 30
    poly = [[5, 5, 15, 5, 15, 12, 5, 12]]
    m = _segm_to_mask(poly, h, w)
    assert m.shape == (h, w) and m.sum() > 0
    from pycocotools import mask as mask_utils
    ref = np.zeros((h, w), np.uint8); ref[3:9, 4:20] = 1
    rle = mask_utils.encode(np.asfortranarray(ref))
    assert (_segm_to_mask({'size': rle['size'], 'counts': rle['counts'].decode()}, h, w) == ref).all()
    # uncompressed RLE: column-major runs, starting with zeros
    counts, flat, prev, run = [], ref.flatten(order='F'), 0, 0
    for v in flat:
        if v == prev: run += 1
        else: counts.append(run); run, prev = 1, v
    counts.append(run)
    assert (_segm_to_mask({'size': [h, w], 'counts': counts}, h, w) == ref).all()
    with pytest.raises(ValueError, match='polygons'): _segm_to_mask(42, h, w)

def _write_voc(root):
    (root/'Annotations').mkdir(parents=True); (root/'JPEGImages').mkdir()
    objs = {'a': [('dog', (11, 21, 40, 60), 0), ('cat', (50, 5, 70, 30), 1)], 'b': []}
    for stem, items in objs.items():
        Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(root/'JPEGImages'/f'{stem}.jpg')
        xml = ''.join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
                      f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                      for n, b, d in items)
        size = '<size><width>80</width><height>64</height><depth>3</depth></size>'
        annotation = f"<annotation><filename>{stem}.jpg</filename>{size}{xml}</annotation>"
        (root/'Annotations'/f'{stem}.xml').write_text(annotation)

def test_voc_xml(tmp_path):
    _write_voc(tmp_path/'voc')
    records, classes = voc_detection_items(tmp_path/'voc'/'Annotations', tmp_path/'voc'/'JPEGImages')
    assert classes == ['background', 'cat', 'dog']
    a, b = records
    np.testing.assert_array_equal(a['boxes'], [[10, 20, 40, 60], [49, 4, 70, 30]])  # VOC counts pixels from 1
    assert a['labels'].tolist() == [2, 1] and a['iscrowd'].tolist() == [0, 1] and len(b['labels']) == 0
    dls = detection_dataloaders_from_folder(tmp_path/'voc', bs=1, augs=None)
    assert len(dls.train_ds) == 1 and len(dls.valid_ds) == 1
    with pytest.raises(ValueError, match='boxes only'): voc_dataloaders(tmp_path/'voc', masks=True)
    with pytest.raises(ValueError, match='neither COCO'):
        detection_dataloaders_from_folder(tmp_path/'voc'/'Annotations')

def test_voc_split_lists_name_annotation_files(tmp_path):
    "ImageSets ids were matched against image stems: images named otherwise than their XML were dropped, silently"
    root = tmp_path/'voc'
    _write_voc(root)
    for stem, image in (('a', 'img_a'), ('b', 'img_b')):  # the XML files keep their names, the images are renamed
        (root/'JPEGImages'/f'{stem}.jpg').rename(root/'JPEGImages'/f'{image}.jpg')
        xml = root/'Annotations'/f'{stem}.xml'
        xml.write_text(xml.read_text().replace(f'<filename>{stem}.jpg', f'<filename>{image}.jpg'))
    (root/'ImageSets'/'Main').mkdir(parents=True)
    (root/'ImageSets'/'Main'/'train.txt').write_text('a\n'); (root/'ImageSets'/'Main'/'val.txt').write_text('b\n')
    dls = voc_dataloaders(root, bs=1, augs=None)
    assert [r['file'].name for r in dls.train_ds.records] == ['img_a.jpg']
    assert [r['file'].name for r in dls.valid_ds.records] == ['img_b.jpg']
    (root/'ImageSets'/'Main'/'val.txt').write_text('b\nc\n')
    with pytest.raises(ValueError, match=r'1 id\(s\) in .*have no Annotations/<id>.xml \(c\)'):
        voc_dataloaders(root, bs=1, augs=None)

def test_malformed_annotations_name_the_file_and_the_fix(tmp_path):
    "Bare AttributeError / KeyError / ParseError before, and duplicate ids merged silently"
    root = tmp_path/'voc'
    _write_voc(root)
    xml = root/'Annotations'/'a.xml'
    good = xml.read_text()
    size = '<size><width>80</width><height>64</height><depth>3</depth></size>'
    for broken, match in ((good.replace(size, ''), r'a.xml has no <size/height>'),
                          (good.replace('<bndbox><xmin>11</xmin>', '<bndbox>'), r'a.xml has no <bndbox/xmin>'),
                          (good[:60], r'a.xml is not well-formed XML')):
        xml.write_text(broken)
        with pytest.raises(ValueError, match=match): voc_detection_items(root/'Annotations', root/'JPEGImages')
    xml.write_text(good.replace('<name>cat</name>', '<name>background</name>'))
    with pytest.raises(ValueError, match="a class named 'background', the name of label 0: rename it"):
        voc_detection_items(root/'Annotations', root/'JPEGImages')
    xml.write_text(good)
    with pytest.raises(ValueError, match='names a class more than once'):
        voc_detection_items(root/'Annotations', root/'JPEGImages', classes=['dog', 'cat', 'dog'])
    images = root/'JPEGImages'
    base = dict(images=[dict(id=1, file_name='a.jpg', height=64, width=80)], annotations=[],
                categories=[dict(id=1, name='dog')])
    cases = [(dict(base, images=base['images'] * 2), 'image id 1 more than once'),
             (dict(base, categories=[dict(id=1, name='dog'), dict(id=1, name='cat')]), 'category id 1 more than once'),
             (dict(base, images=[dict(id=1, file_name='a.jpg')]), 'lacks height, width'),
             (dict(base, annotations=[dict(id=7, image_id=1, category_id=1, bbox=None)]),
              r'Annotation 7 .* has bbox None, not \[x, y, width, height\]')]
    for coco, match in cases:
        (tmp_path/'c.json').write_text(json.dumps(coco))
        with pytest.raises(ValueError, match=match): coco_detection_items(images, tmp_path/'c.json')
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(np.ones((32, 40), np.uint8)))
    with pytest.raises(ValueError, match=r'RLE segmentation of size \[32, 40\] on an image of height 64 and width 80'):
        _segm_to_mask({'size': rle['size'], 'counts': rle['counts'].decode()}, 64, 80)

def test_augment_drops_objects_with_their_masks(tmp_path):
    path = make_detection_shapes(tmp_path/'s', n_images=6, size=96, seed=5, max_objects=3)
    records, classes, _ = coco_detection_items(path/'images', path/'annotations.json')
    ds = DetectionDataset(records, classes, with_masks=True)
    i = max(range(len(ds)), key=lambda i: len(records[i]['labels']))
    _, full = ds[i]
    aug = DetectionDataset(records, classes, with_masks=True, augment=[A.Crop(0, 0, 48, 96)])  # keep the left half
    img, t = aug[i]
    assert img.shape == (3, 96, 48)
    cropped = full['masks'][:, :, :48]
    kept = cropped.flatten(1).any(1)
    assert torch.equal(t['labels'], full['labels'][kept]) and torch.equal(t['masks'], cropped[kept])
    assert (boxes_from_masks(t['masks'].numpy()) == t['boxes'].numpy()).all() and (t['boxes'][:, 2] <= 48).all()
    boxes_only = DetectionDataset(records, classes, augment=[A.HorizontalFlip(p=1.)])
    _, tf = boxes_only[i]
    torch.testing.assert_close(tf['boxes'][:, [2, 0]], 96 - full['boxes'][:, [0, 2]])
    with pytest.raises(ValueError, match='bbox_params'): DetectionAugment(A.Compose([A.HorizontalFlip()]))

def test_augment_seeding(tmp_path):
    "Unseeded pipelines draw from numpy (which fastai seeds per epoch and worker); a pipeline given a seed keeps it"
    path = make_detection_shapes(tmp_path/'s', n_images=2, size=64, seed=1)
    records, classes, _ = coco_detection_items(path/'images', path/'annotations.json')
    bbox_params = A.BboxParams(format='pascal_voc', label_fields=['labels', 'index'])
    augs = lambda **kw: A.Compose([A.Affine(rotate=(-40, 40), p=1.)], bbox_params=bbox_params, **kw)
    def draw(np_seed, **kw):
        np.random.seed(np_seed)
        return DetectionDataset(records, classes, augment=augs(**kw))[0][0]
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    assert torch.equal(draw(0, seed=7), draw(1, seed=7))

def test_coco_errors(tmp_path):
    path = make_detection_shapes(tmp_path/'s', n_images=3, size=64, seed=0)
    bad = json.loads((path/'annotations.json').read_text()); bad['annotations'][0]['category_id'] = 99
    (tmp_path/'bad.json').write_text(json.dumps(bad))
    with pytest.raises(ValueError, match='category_id 99'): coco_detection_items(path/'images', tmp_path/'bad.json')
    with pytest.raises(ValueError, match='does not exist'): coco_detection_items(path/'images', tmp_path/'none.json')
    with pytest.raises(ValueError, match='not in'): coco_detection_items(tmp_path, path/'annotations.json')

def test_coco_evaluate_masks_and_crowd():
    m1 = torch.zeros(1, 40, 40, dtype=torch.uint8); m1[0, 5:25, 5:25] = 1
    t = dict(boxes=torch.tensor([[5., 5., 25., 25.], [30., 30., 38., 38.]]), labels=torch.tensor([1, 1]),
             iscrowd=torch.tensor([0, 1]),
             masks=torch.cat([m1, torch.zeros(1, 40, 40, dtype=torch.uint8)]))
    t['masks'][1, 30:38, 30:38] = 1
    pred = dict(boxes=t['boxes'][:1], labels=t['labels'][:1], scores=torch.tensor([0.9]), masks=m1[None].float())
    res = coco_evaluate([pred], [t])
    # the crowd region is not a miss
    assert res['bbox']['AP'] == pytest.approx(1.) and res['segm']['AP'] == pytest.approx(1.)
    half = dict(pred, masks=torch.zeros(1, 1, 40, 40))
    half['masks'][0, 0, 5:25, 5:15] = 1  # mask IoU 0.5: a hit at 0.5 only
    res = coco_evaluate([half], [t])
    assert res['bbox']['AP'] == pytest.approx(1.)
    assert res['segm']['AP50'] == pytest.approx(1.) and res['segm']['AP75'] == pytest.approx(0.)
    nothing = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64), scores=torch.zeros(0))
    bbox = coco_evaluate([nothing], [t])['bbox']
    # nothing detected: 0 where an object of that size exists (the 400 px² one is small), NaN where none does, as
    # with detections
    assert [bbox[k] for k in ('AP', 'AP50', 'AP75', 'APs')] == [0.] * 4
    assert np.isnan(bbox['APm']) and np.isnan(bbox['APl'])
    found = coco_evaluate([pred], [t])['bbox']
    assert [np.isnan(found[k]) for k in COCO_STATS] == [np.isnan(bbox[k]) for k in COCO_STATS]

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "One short fit through `train_detection`, the command line's trainer"
    tmp = tmp_path_factory.mktemp('det')
    data = make_detection_shapes(tmp/'shapes', n_images=16, size=96, seed=0, max_objects=2, min_radius=0.15,
                                 max_radius=0.3)
    torch.manual_seed(0)
    res = train_detection(data, out=tmp/'run', task='detect', arch='res2net50d', size=96, bs=4, epochs=10, lr=0.02,
                          augs=None, valid_pct=0.25, **TINY)
    return tmp, data, res

def test_fit_loss_falls(trained):
    tmp, data, res = trained
    rows = list(csv.DictReader(open(tmp/'run'/'metrics.csv')))
    assert len(rows) == 10
    train_loss = [float(r['train_loss']) for r in rows]
    print('train loss by epoch', train_loss, 'seconds', res['train_seconds'])
    assert train_loss[-1] < 0.7 * train_loss[0], train_loss
    parts = {'loss_objectness', 'loss_rpn_box_reg', 'loss_classifier', 'loss_box_reg'}
    assert {'box_AP', 'box_AP50'} | parts <= set(rows[0])

def test_fit_outputs_and_ap_on_training_images(trained):
    tmp, data, res = trained
    out = tmp/'run'
    for f in ('export.pkl', 'model.safetensors', 'metrics.csv', 'metrics.json', 'loss.png', 'predictions.png'):
        assert (out/f).is_file(), f
    assert json.loads((out/'metrics.json').read_text())['box']['AP'] == res['box']['AP']
    records, classes, _ = coco_detection_items(data/'images', data/'annotations.json')
    ap = evaluate_detector(out/'export.pkl', DetectionDataset(records, classes))
    print('AP on the training images', ap)
    assert ap['bbox']['AP50'] > 0.3 and ap['bbox']['AP'] > 0.1

def test_export_round_trip_and_predict_json(trained):
    tmp, data, res = trained
    from fastai.learner import load_learner
    learn = load_learner(tmp/'run'/'export.pkl')
    assert isinstance(learn, DetectionLearner) and learn.classes == ['background', 'circle', 'square', 'triangle']
    img = data/'images'/'0000.png'
    det = learn.predict(img, thresh=0.)
    assert set(det) == {'boxes', 'labels', 'scores', 'names'} and det['boxes'].shape[1] == 4
    js = predict_detection(tmp/'run'/'export.pkl', img, thresh=0.)
    json.dumps(js)
    assert len(js['detections']) == len(det['boxes'])
    if js['detections']: assert js['detections'][0]['box'] == [round(v, 2) for v in det['boxes'][0].tolist()]
    learn2 = load_learner(tmp/'run'/'export.pkl')
    torch.testing.assert_close(learn2.predict(img, thresh=0.)['boxes'], det['boxes'])
    with pytest.raises(ValueError, match='No exported learner'): predict_detection(tmp/'none.pkl', img)

def test_learner_lr_find_fp16_empty_batches(tmp_path):
    from fastai.callback.training import ShortEpochCallback
    data = make_detection_shapes(tmp_path/'s', n_images=10, size=64, seed=2, empty_every=2)
    dls = coco_dataloaders(data/'images', data/'annotations.json', augs=None, bs=2)
    learn = res2netplus_det_learner(dls, 'res2net50d', min_size=64, max_size=64, loss_weights={'loss_classifier': 2.},
                                    **TINY)
    learn.lr_find(num_it=4, show_plot=False)
    learn.to_fp16()
    learn.fit(1, 1e-3, cbs=ShortEpochCallback(pct=0.5))
    assert math.isfinite(learn.recorder.losses[-1])
    empty = [t for t in [dls.train_ds[i][1] for i in range(len(dls.train_ds))] if len(t['labels']) == 0]
    assert empty  # images without objects are items too
    with pytest.raises(ValueError, match='loss_weights'):
        bad = res2netplus_det_learner(dls, 'res2net50d', min_size=64, max_size=64, loss_weights={'loss_mask': 1.},
                                      **TINY)
        bad.fit(1, cbs=ShortEpochCallback(pct=0.01))
    with pytest.raises(ValueError, match='masks=True'): res2netplus_det_learner(dls, 'res2net50d', task='instance')

def test_boxes_outside_the_image_are_clipped_and_empty_ones_dropped(tmp_path):
    "COCO and VOC alike: clipped to the image or dropped (with their labels and masks), and the counts said"
    path = make_detection_shapes(tmp_path/'s', n_images=1, size=64, seed=0, max_objects=1)
    ann = json.loads((path/'annotations.json').read_text())
    good = ann['annotations'][0]
    extra = [dict(good, id=100, bbox=[50, 40, 30, 10]),   # reaches 16 px past the right edge: clipped to 50..64
             dict(good, id=101, bbox=[10, 10, 0, 5]),     # no width
             dict(good, id=102, bbox=[70, 10, 5, 5])]     # wholly outside
    ann['annotations'] += extra
    (tmp_path/'a.json').write_text(json.dumps(ann))
    with pytest.warns(UserWarning, match=r'clipped 1 box\(es\).*dropped 2 box\(es\)'):
        records, classes, _ = coco_detection_items(path/'images', tmp_path/'a.json')
    r = records[0]
    assert len(r['boxes']) == len(r['labels']) == len(r['segms']) == 2
    np.testing.assert_allclose(r['boxes'][1], [50, 40, 64, 50])
    ds = DetectionDataset(records, classes, with_masks=True)
    _, t = ds[0]
    assert len(t['masks']) == len(t['boxes']) == 2
    _write_voc(tmp_path/'voc')
    xml = tmp_path/'voc'/'Annotations'/'a.xml'
    xml.write_text(xml.read_text().replace('<xmax>70</xmax>', '<xmax>95</xmax>'))  # the cat reaches past the 80 px
    with pytest.warns(UserWarning, match=r'clipped 1 box\(es\).*dropped 0'):
        records, _ = voc_detection_items(tmp_path/'voc'/'Annotations', tmp_path/'voc'/'JPEGImages')
    assert records[0]['boxes'][1].tolist() == [49, 4, 80, 30]

@pytest.mark.parametrize('factory', [fasterrcnn_res2net_fpn, maskrcnn_res2netplus50_fpn, cascade_rcnn_res2net_fpn])
def test_torchvision_pretrained_keyword_is_accepted_or_refused_with_the_fix(factory):
    "torchvision's `pretrained=False` failed with `got multiple values for argument 'pretrained'` (issue 26)"
    arch = () if factory is maskrcnn_res2netplus50_fpn else ('res2net50d',)
    small = dict(layers=(1, 1, 1, 1), out_channels=32, representation_size=32)
    model = factory(*arch, num_classes=3, pretrained=False, weights=None, **small)  # no detector weights: nothing asked
    assert isinstance(model, (FasterRCNN, MaskRCNN))
    for bad in (dict(pretrained=True), dict(weights='coco.pth')):
        with pytest.raises(ValueError, match=r'whole detector trained on COCO.*pretrained_backbone=True.*weights_back'):
            factory(*arch, num_classes=3, **bad, **small)

# the classes and functions of `res2netplus.detection` when it was one module: an export.pkl made then names them so
OLD_MODULE_OBJECTS = '''
frozen_batchnorm _check_backbone_args res2net_fpn_backbone rpn_anchor_generator split_rcnn_kwargs _rcnn
fasterrcnn_res2net_fpn maskrcnn_res2net_fpn fasterrcnn_res2netplus50_fpn maskrcnn_res2netplus50_fpn
fasterrcnn_res2net101d_fpn maskrcnn_res2net101d_fpn fasterrcnn_res2netplus101_fpn maskrcnn_res2netplus101_fpn
_segm_to_mask _record clean_boxes coco_detection_items _xml_text voc_detection_items detection_augs boxes_from_masks
DetectionAugment DetectionDataset detection_collate draw_detections DetectionDataLoader detection_dataloaders
split_records coco_dataloaders voc_dataloaders detection_dataloaders_from_folder _shape_annotation
make_detection_shapes _cpu _rle COCOAccumulator coco_evaluate COCOMetric coco_metrics _train_targets loss_mode
loss_names has_mask_head Detections DetectionLoss LossPart DetectionCallback GatherDetections _to_image
DetectionLearner detection_sgd detection_splitter detection_learner detector_factory res2netplus_det_learner
_detection_dl evaluate_detector train_detection predict_detection
'''.split()

def test_pickled_paths_of_the_old_modules_resolve():
    "A pickle names an object by module and name: the old `res2netplus.detection.X` and `res2netplus.cascade.X` load"
    import importlib, pickle
    import res2netplus.detection.cascade as cascade
    old = [('res2netplus.detection', n) for n in OLD_MODULE_OBJECTS]
    old += [('res2netplus.cascade', n) for n in ('CascadeRCNN', 'CascadeRoIHeads', 'CascadeStage',
                                                 'CascadeBoxPredictor', 'StageSamples', 'cascade_rcnn_res2net_fpn')]
    for module, name in old:
        obj = pickle.loads(f'c{module}\n{name}\n.'.encode())  # the GLOBAL opcode of fastai's protocol-2 export
        assert obj is getattr(importlib.import_module(obj.__module__), name), (module, name)
        assert obj.__module__.startswith('res2netplus.detection.'), (module, name)  # defined in one of the new modules
    assert importlib.import_module('res2netplus.cascade').__all__ == cascade.__all__
