"Segmentation data: the generated shapes dataset, the folder check and the mask lookup"
import pickle, shutil
import numpy as np
import pytest
from PIL import Image
from res2netplus.data import (SHAPES_CODES, SHAPES_COLOURS, make_shapes, check_segmentation_folder, read_valid_stems,
                              MaskFromImage, image_files)

def load(path, i):
    return np.asarray(Image.open(path/'images'/f'{i:04d}.png')), np.asarray(Image.open(path/'masks'/f'{i:04d}.png'))

@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp('shapes'), n_images=12, size=48, seed=3)

def test_deterministic_given_seed(shapes, tmp_path):
    again = make_shapes(tmp_path/'again', n_images=12, size=48, seed=3)
    other = make_shapes(tmp_path/'other', n_images=12, size=48, seed=4)
    for i in range(12):
        assert all((a == b).all() for a, b in zip(load(shapes, i), load(again, i)))
    assert any((load(shapes, i)[1] != load(other, i)[1]).any() for i in range(12))
    assert (shapes/'codes.txt').read_text().split() == SHAPES_CODES

def test_masks_match_the_drawn_shapes(shapes):
    seen = set()
    for i in range(12):
        img, mask = load(shapes, i)
        assert mask.dtype == np.uint8 and Image.open(shapes/'masks'/f'{i:04d}.png').mode == 'L'
        assert (img[mask == 0].max(-1) < 100).all()  # background: dark noise
        for k, rgb in SHAPES_COLOURS.items():
            inside = img[mask == k]
            if len(inside): seen.add(k)
            assert (inside.argmax(-1) == int(np.argmax(rgb))).all() and (inside.max(-1) >= 150).all(), (i, k)
        assert 0 < (mask > 0).mean() < 0.9
    assert seen == {1, 2, 3}
    # and the other way round: the mask read back from the colours alone is the mask written
    channel_class = {int(np.argmax(rgb)): k for k, rgb in SHAPES_COLOURS.items()}
    for i in range(12):
        img, mask = load(shapes, i)
        from_colour = np.where(img.max(-1) >= 150, np.vectorize(channel_class.get)(img.argmax(-1)), 0)
        assert (from_colour == mask).all(), i

def test_odd_sizes(tmp_path):
    path = make_shapes(tmp_path/'odd', n_images=3, size=(45, 67), max_objects=5)
    img, mask = load(path, 2)
    assert img.shape == (45, 67, 3) and mask.shape == (45, 67)
    assert check_segmentation_folder(path) == SHAPES_CODES
    assert make_shapes(tmp_path/'odd', n_images=3, size=(45, 67), max_objects=5) == path  # idempotent
    with pytest.raises(ValueError, match='pass another folder'): make_shapes(tmp_path/'odd', n_images=3, size=45)
    with pytest.raises(ValueError, match='at least 8 pixels'): make_shapes(tmp_path/'x', size=(45, 4))

@pytest.fixture
def bad(shapes, tmp_path):
    shutil.copytree(shapes, tmp_path/'bad')
    return tmp_path/'bad'

def test_missing_parts(bad):
    (bad/'masks'/'0003.png').unlink(); (bad/'masks'/'0007.png').unlink()
    with pytest.raises(ValueError, match=r'2 of 12 image\(s\) have no mask .*0003.png, 0007.png'):
        check_segmentation_folder(bad)
    shutil.rmtree(bad/'masks')
    with pytest.raises(ValueError, match='masks is missing'): check_segmentation_folder(bad)
    (bad/'codes.txt').unlink()
    with pytest.raises(ValueError, match='is missing'): check_segmentation_folder(bad)

def test_codes(bad):
    (bad/'codes.txt').write_text('\n\n')
    with pytest.raises(ValueError, match='names no classes'): check_segmentation_folder(bad)
    (bad/'codes.txt').write_text('bg\ncircle\nbg\nx\n')
    with pytest.raises(ValueError, match='bg more than once'): check_segmentation_folder(bad)
    (bad/'codes.txt').unlink()
    with pytest.raises(ValueError, match='codes.txt is missing: write the class names'): check_segmentation_folder(bad)

def test_class_ids_beyond_codes(bad):
    (bad/'codes.txt').write_text('background\ncircle\n')  # squares (2) and triangles (3) are not named
    with pytest.raises(ValueError, match=r'hold class ids that .*codes.txt does not name \(it names 2: ids 0–1\)') as e:
        check_segmentation_folder(bad)
    assert str(bad/'masks') in str(e.value)
    assert 'Add the missing class names' in str(e.value) and 'set those pixels to 255' in str(e.value)
    (bad/'codes.txt').write_text('\n'.join(SHAPES_CODES))
    mask = np.zeros((48, 48), np.uint8); mask[:4] = 7; mask[-4:] = 255
    Image.fromarray(mask).save(bad/'masks'/'0005.png')
    with pytest.raises(ValueError, match=r"1 mask\(s\) .*0005.png has 7\. "): check_segmentation_folder(bad)
    with pytest.raises(ValueError, match=r'has 7, 255\. Add the missing class names to .*codes.txt\.$'):
        check_segmentation_folder(bad, ignore_index=None)

def test_mask_size_and_mode(bad):
    Image.fromarray(np.zeros((48, 40), np.uint8)).save(bad/'masks'/'0002.png')
    resized = r'1 mask\(s\) differ in size from their image \(0002.png is 40×48, its image 48×48\)'
    with pytest.raises(ValueError, match=resized): check_segmentation_folder(bad)
    Image.fromarray(np.zeros((48, 48), np.uint8)).convert('P').save(bad/'masks'/'0002.png')
    with pytest.raises(ValueError, match='palette image'): check_segmentation_folder(bad)
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(bad/'masks'/'0002.png')
    with pytest.raises(ValueError, match='mode RGB'): check_segmentation_folder(bad)
    (bad/'masks'/'0002.png').write_bytes(b'not a png')
    with pytest.raises(ValueError, match=r'1 unreadable or damaged image\(s\) in .*masks'):
        check_segmentation_folder(bad)

def test_images(bad):
    (bad/'images'/'sub').mkdir(); shutil.copy(bad/'images'/'0000.png', bad/'images'/'sub')
    with pytest.raises(ValueError, match='put every image directly in'): check_segmentation_folder(bad)
    shutil.rmtree(bad/'images'/'sub')
    (bad/'images'/'0004.png').write_text('broken')
    with pytest.raises(ValueError, match=r'1 unreadable or damaged image\(s\) in .*images'):
        check_segmentation_folder(bad)
    for f in (bad/'images').iterdir(): f.unlink()
    with pytest.raises(ValueError, match='has no images'): check_segmentation_folder(bad)

def test_mask_lookup(bad):
    (bad/'masks'/'0001.png').rename(bad/'masks'/'0001.tif')
    get_y = pickle.loads(pickle.dumps(MaskFromImage(bad/'masks')))
    assert get_y(bad/'images'/'0001.png') == bad/'masks'/'0001.tif'
    assert get_y('elsewhere/0002.jpg') == bad/'masks'/'0002.png'
    assert check_segmentation_folder(bad) == SHAPES_CODES
    assert [f.name for f in image_files(bad/'images')][:2] == ['0000.png', '0001.png']

def test_valid_stems(bad):
    assert read_valid_stems(bad) is None
    (bad/'valid.txt').write_text('0001\n0002.png\n\n')
    assert read_valid_stems(bad) == ['0001', '0002']
    (bad/'valid.txt').write_text('0001\nnope\n')
    with pytest.raises(ValueError, match=r'1 name\(s\) in .*valid.txt are not images .*\(nope\)'): read_valid_stems(bad)
    (bad/'valid.txt').write_text('\n'.join(f'{i:04d}' for i in range(12)))
    with pytest.raises(ValueError, match='leave some for training'): read_valid_stems(bad)

def test_real_data_tiling_without_the_download():
    "benchmarks/real_data.py: the nuclei split (35 training tiles, 4 held out, no row shared) and the box clipping"
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1]/'benchmarks'))
    import real_data
    origins = real_data._origins(128, 64, 128, 384)
    assert len(origins['train']) == 35 and len(origins['valid']) == 4
    assert max(y for y, _ in origins['train']) + 128 <= 384 <= min(y for y, _ in origins['valid'])
    assert real_data._starts(1035, 400) == [0, 400, 635] and real_data._starts(400, 400) == [0]
    img = np.zeros((500, 500, 3), np.uint8)
    # inside; half outside the first tile (kept there, truncated); mostly outside (dropped there)
    recs = real_data._tile_boxes(img, [[10, 10, 50, 60], [380, 0, 420, 20], [395, 100, 430, 140]], ['a', 'b', 'c'],
                                 400, 'x')
    assert [r['origin'] for r in recs] == [(0, 0), (0, 100), (100, 0), (100, 100)]
    first = {a['label']: a for a in recs[0]['annotations']}
    assert sorted(first) == ['a', 'b'] and first['b']['bbox_xyxy'] == [380, 0, 400, 20] and first['b']['truncated']
    assert first['a']['bbox'] == [10, 10, 40, 50] and not first['a']['truncated']
    with pytest.raises(ValueError, match="Unknown data wheel 'kaggle'"): real_data.fetch_wheel('kaggle')
