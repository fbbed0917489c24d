"""biformer_zoo.viz: the recorded routing is the layer's, the attention maps are the layers' own weights, the figures
draw what they say, and the errors name the fix. Mechanics only, on random models and small odd-sized inputs."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import biformer_zoo  # noqa: F401  (registers the models)
from biformer_zoo import cli
from biformer_zoo.layers import C2fAttention
from biformer_zoo.layers import AttentionLePE, BiLevelRoutingAttention, LSDAttention
from biformer_zoo.layers.bra import ATTN_IMPLS, routed_attention_impl
from biformer_zoo.viz import (
    AttentionMap, attention_layers, attention_map, plot_attention, plot_routing, record_routing, visualize)

matplotlib = pytest.importorskip('matplotlib')

INPUT = (75, 100)  # odd, non-square: every stage pads


@pytest.fixture(scope='module')
def biformer():
    torch.manual_seed(0)
    return timm.create_model('biformer_tiny').eval()


@pytest.fixture(scope='module')
def crossformer():
    torch.manual_seed(0)
    return timm.create_model('crossformer_tiny').eval()


@pytest.fixture(scope='module')
def images():
    return torch.randn(1, 3, *INPUT, generator=torch.Generator().manual_seed(1))


def bra_layer(**kwargs) -> BiLevelRoutingAttention:
    torch.manual_seed(0)
    return BiLevelRoutingAttention(32, num_heads=4, num_regions=4, topk=3, **kwargs).eval()


def nhwc(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if layer.channels_last else x.permute(0, 2, 3, 1)


def routing_from_input(layer: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """The routing recomputed from a layer's input and weights: (B, regions, topk)."""
    x = nhwc(layer, x)
    B, H, W, _ = x.shape
    n = layer.num_regions
    x = F.pad(x, (0, 0, 0, -W % n, 0, -H % n))
    rh, rw = x.shape[1] // n, x.shape[2] // n
    qk = F.linear(x, layer.qkv.weight[:2 * layer.qk_dim], layer.qkv.bias[:2 * layer.qk_dim])
    means = qk.reshape(B, n, rh, n, rw, -1).mean((2, 4)).flatten(1, 2)  # (B, regions, 2 qk_dim)
    q, k = means.split(layer.qk_dim, dim=-1)
    return ((q * layer.scale) @ k.transpose(1, 2)).topk(layer.topk, dim=-1).indices


def layer_inputs(model: nn.Module, images: torch.Tensor):
    """Run the model and return {name: input} of each routed layer, captured by the test's own hooks."""
    inputs, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, BiLevelRoutingAttention):
            handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0])))
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return inputs


def runs_here(impl: str) -> bool:
    try:
        with torch.no_grad():
            bra_layer(attn_impl=impl)(torch.randn(1, 32, 8, 8))
    except (ValueError, RuntimeError, NotImplementedError) as e:
        if any(word in str(e).lower() for word in ('cuda', 'not available', 'not support', 'cpu')):
            return False
        raise
    return True


@pytest.mark.parametrize('impl', ATTN_IMPLS)
def test_recorded_routing_is_the_routing_of_the_layer_input(biformer, images, impl):
    if not runs_here(impl):
        pytest.skip(f"attn_impl={impl!r} does not run on this machine's CPU")
    with torch.no_grad(), routed_attention_impl(biformer, impl), record_routing(biformer) as records:
        inputs = layer_inputs(biformer, images)
    assert sorted(records) == sorted(inputs) and len(records) == 12
    for name, x in inputs.items():
        assert torch.equal(records[name].indices, routing_from_input(attention_layers(biformer)[name], x)), name


def test_record_holds_sizes_and_scores(images, biformer):
    with torch.inference_mode(), record_routing(biformer) as records:
        biformer(images)
    record = records['stages.2.blocks.0.attn']  # stride 16: 75x100 -> 5x7, padded to 7x7
    assert (record.map_size, record.padded_size, record.num_regions, record.indices.dtype) == \
        ((5, 7), (7, 7), 7, torch.int64)
    assert torch.equal(record.scores.topk(record.topk, dim=-1).indices, record.indices)


def test_recording_changes_no_output_and_works_under_inference_mode(biformer, images):
    with torch.inference_mode():
        plain = biformer(images)
        with record_routing(biformer) as records:
            recorded = biformer(images)
    assert torch.equal(plain, recorded) and len(records) == 12


def hooks_on(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_no_hooks_are_left_after_the_block_nor_after_an_exception(biformer, images):
    before = hooks_on(biformer)
    with record_routing(biformer):
        assert hooks_on(biformer) == before + 24  # a pre-hook per layer, a hook per router
    with pytest.raises(KeyError):
        with record_routing(biformer):
            raise KeyError('inside')
    assert hooks_on(biformer) == before == 0


def test_records_a_layer_alone_a_sequential_and_a_c2f_block():
    torch.manual_seed(0)
    layer = bra_layer()
    sequential = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), bra_layer())
    c2f = C2fAttention(32, 32, depth=2, attention='bra', num_heads=4, num_regions=4, topk=3).eval()
    found = {}
    with torch.no_grad():
        for model, x in ((layer, torch.randn(2, 32, 13, 17)), (sequential, torch.randn(2, 3, 25, 33)),
                         (c2f, torch.randn(2, 32, 13, 17))):
            with record_routing(model) as records:
                model(x)
            found[type(model).__name__] = {name: (r.indices.shape, r.map_size) for name, r in records.items()}
    shape = torch.Size([2, 16, 3])
    assert found == {
        'BiLevelRoutingAttention': {'': (shape, (13, 17))},
        'Sequential': {'1': (shape, (13, 17))},
        'C2fAttention': {'blocks.0.attn': (shape, (13, 17)), 'blocks.1.attn': (shape, (13, 17))},
    }


def test_records_and_maps_a_yolo_with_c2fbra(yolo_config_dir):
    pytest.importorskip('ultralytics')
    from ultralytics.nn.tasks import DetectionModel
    from biformer_zoo.integrations.ultralytics import model_cfg
    torch.manual_seed(0)
    model = DetectionModel(model_cfg('yolov8n-bra.yaml'), verbose=False).eval()
    images = torch.randn(1, 3, 224, 288)
    with torch.no_grad(), record_routing(model) as records:
        model(images)
        amap = attention_map(model, images, None, (200, 250))  # the default: the last routed layer, at stride 32
    assert {name: r.map_size for name, r in records.items()} == {'model.10': (7, 9), 'model.22.blocks.0.attn': (7, 9)}
    assert (amap.layer, amap.stride, amap.token) == ('model.22.blocks.0.attn', (32., 32.), (6, 7))


def test_attention_map_runs_the_model_in_eval_mode_and_restores_the_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), bra_layer()).train()
    model[0].eval()
    attention_map(model, torch.randn(1, 3, 13, 17), '2', (3, 4))
    assert [m.training for m in model] == [False, True, True] and model[1].num_batches_tracked == 0


def test_record_routing_without_routed_attention_names_the_fix():
    with pytest.raises(ValueError, match='no BiLevelRoutingAttention.*biformer_'):
        with record_routing(LSDAttention(32, 4)):
            pass


# attention_map: the layers' own weights


def layer_output_at(layer: nn.Module, x: torch.Tensor, amap: AttentionMap) -> torch.Tensor:
    """The layer's output at the query token rebuilt from the map: proj(weights @ v (+ LePE))."""
    xh = nhwc(layer, x)[0]
    Hp, Wp = amap.padded_weights.shape[1:]
    xh = F.pad(xh, (0, 0, 0, Wp - xh.shape[1], 0, Hp - xh.shape[0]))
    dim = layer.proj.in_features
    v = layer.qkv(xh)[..., -dim:]  # (Hp, Wp, dim)
    heads = amap.padded_weights.shape[0]
    out = (amap.padded_weights.reshape(heads, 1, -1) @ v.reshape(-1, heads, dim // heads).transpose(0, 1)).flatten()
    row, col = amap.token
    if isinstance(layer, BiLevelRoutingAttention):
        out = out + layer.lepe(v.permute(2, 0, 1)[None])[0, :, row, col]
    elif isinstance(layer, AttentionLePE):
        out = out + layer.lepe(xh.permute(2, 0, 1)[None])[0, :, row, col]
    return layer.proj(out)


LAYERS = {
    'routed': lambda: bra_layer(),
    'routed-channels-last': lambda: bra_layer(channels_last=True),
    'sda': lambda: LSDAttention(32, 4, group_size=5),
    'lda-crossformer': lambda: LSDAttention(32, 4, group_size=5, interval=3, long_distance=True),
    'lda-crossformerpp': lambda: LSDAttention(32, 4, group_size=5, interval=3, long_distance=True,
                                              group_rule='crossformerpp'),
    'global': lambda: AttentionLePE(32, 4),
}


@pytest.mark.parametrize('kind', LAYERS)
@pytest.mark.parametrize('query', [(0, 0), (7, 11), (12, 16)])
def test_attention_map_weights_give_the_layer_output_at_the_query(kind, query):
    torch.manual_seed(0)
    layer = LAYERS[kind]().eval()
    x = torch.randn(1, 13, 17, 32) if layer.channels_last else torch.randn(1, 32, 13, 17)
    amap = attention_map(layer, x, None, query)
    with torch.no_grad():
        expected = nhwc(layer, layer(x))[0, query[0], query[1]]
        rebuilt = layer_output_at(layer, x, amap)
    assert torch.allclose(rebuilt, expected, atol=1e-5), (rebuilt - expected).abs().max()


@pytest.mark.parametrize('kind', LAYERS)
def test_attention_map_sums_to_one_per_head(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]().eval()
    x = torch.randn(1, 16, 16, 32) if layer.channels_last else torch.randn(1, 32, 16, 16)  # no padding anywhere
    amap = attention_map(layer, x, '', (9, 4))
    assert amap.weights.shape == (4, 16, 16)
    assert torch.allclose(amap.weights.sum((1, 2)), torch.ones(4), atol=1e-6)


def test_routed_attention_map_is_the_plain_softmax_row_inside_the_routed_regions(biformer, images):
    layer_name = 'stages.1.blocks.1.attn'  # stride 8: 75x100 -> 10x13, padded to 14x14, 2x2 tokens per region
    layer = attention_layers(biformer)[layer_name]
    query = (37, 61)
    with torch.no_grad(), record_routing(biformer) as records:
        amap = attention_map(biformer, images, layer_name, query)
        x = layer_inputs(biformer, images)[layer_name]
    record = records[layer_name]
    assert amap.token == (37 // 8, 61 // 8) and amap.stride == (8., 8.)
    # the regions the layer routed the query's region to, from the record, as a token mask over the padded map
    rows, cols = torch.arange(14) // 2, torch.arange(14) // 2
    token_region = rows.view(-1, 1) * 7 + cols.view(1, -1)
    region = (amap.token[0] // 2) * 7 + amap.token[1] // 2
    allowed = torch.isin(token_region, record.indices[0, region])
    # plain softmax(q k^T * scale) of the query token over the allowed keys
    xh = F.pad(x[0], (0, 0, 0, 1, 0, 4))  # (14, 14, C)
    q, k = layer.qkv(xh)[..., :2 * layer.qk_dim].detach().split(layer.qk_dim, -1)
    heads = layer.num_heads
    logits = torch.einsum('hd,nhd->hn', q[amap.token].view(heads, -1), k.reshape(-1, heads, q.shape[-1] // heads))
    expected = (logits * layer.scale).masked_fill(~allowed.flatten(), float('-inf')).softmax(-1).view(heads, 14, 14)
    assert torch.equal(amap.allowed, allowed) and amap.padded_weights[:, ~allowed].abs().sum() == 0
    assert torch.allclose(amap.padded_weights, expected, atol=1e-6)
    assert torch.allclose(amap.weights.sum((1, 2)) + amap.padding_weight, torch.ones(heads), atol=1e-6)


def test_grouped_attention_map_on_crossformer_covers_the_query_group(crossformer, images):
    amap = attention_map(crossformer, images, 'stages.2.blocks.1.attn', (70, 99))  # LDA at stride 16: 5x7 map
    assert (amap.kind, amap.map_size, amap.token) == ('grouped', (5, 7), (4, 6))
    assert amap.allowed[amap.token] and torch.equal(amap.padded_weights[:, ~amap.allowed].abs().sum(), torch.tensor(0.))
    assert torch.allclose(amap.weights.sum((1, 2)), torch.ones(amap.weights.shape[0]), atol=1e-5)


def test_global_attention_map_of_biformer_last_stage(biformer, images):
    amap = attention_map(biformer, images, 'stages.3.blocks.1.attn', (74, 99))  # stride 32: 3x4 map
    assert (amap.kind, amap.map_size, amap.token, bool(amap.allowed.all())) == ('global', (3, 4), (2, 3), True)


# errors


@pytest.mark.parametrize('query, match', [
    ((75, 0), r'outside the 75x100 input image; pass row in \[0, 74\] and col in \[0, 99\]'),
    ((0, -1), r'pass row in \[0, 74\]'),
    ((1.5, 2), 'two ints'),
    ((1, 2, 3), 'two ints'),
    (7, 'two ints'),
])
def test_a_query_outside_the_image_names_the_valid_range(biformer, images, query, match):
    with pytest.raises(ValueError, match=match):
        attention_map(biformer, images, None, query)


def test_an_unknown_layer_lists_the_valid_names(biformer, images):
    with pytest.raises(ValueError, match=r"unknown layer 'stages.2.attn'.*valid names: 'stages.0.blocks.0.attn'.*"
                                         r"'stages.3.blocks.1.attn'"):
        attention_map(biformer, images, 'stages.2.attn', (0, 0))


def test_a_model_without_attention_layers_names_the_fix():
    with pytest.raises(ValueError, match=r'no BiLevelRoutingAttention, LSDAttention or AttentionLePE.*Grad-CAM'):
        attention_map(nn.Sequential(nn.Conv2d(3, 8, 3)), torch.randn(1, 3, 32, 32), None, (0, 0))


class UnusedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3)
        self.attn = bra_layer()

    def forward(self, x):
        return self.conv(x)


def test_a_layer_the_forward_does_not_use_names_the_fix():
    with pytest.raises(ValueError, match="layer 'attn' did not run in the forward of UnusedAttention; name a layer"):
        attention_map(UnusedAttention(), torch.randn(1, 3, 16, 16), 'attn', (0, 0))


def test_a_batch_of_images_names_the_fix(biformer):
    with pytest.raises(ValueError, match=r'one image, got a batch of 2; pass images\[i:i \+ 1\]'):
        attention_map(biformer, torch.randn(2, 3, 64, 64), None, (0, 0))


# figures


def patches(figure, prefix: str):
    return [p for ax in figure.axes for p in ax.patches if (p.get_gid() or '').startswith(prefix)]


@pytest.mark.parametrize('size', [(75, 100), (250, 333)])
def test_routing_figure_shades_topk_regions_clipped_to_the_image(biformer, size):
    images = torch.randn(1, 3, *size)
    with torch.no_grad(), record_routing(biformer) as records:
        biformer(images)
    record = records['stages.1.blocks.0.attn']
    figure = plot_routing(images, record, (size[0] - 1, size[1] // 2))
    ax = figure.axes[0]
    assert len(patches(figure, 'routed-')) == record.topk == 4 and len(patches(figure, 'query-region')) == 1
    assert (ax.get_xlim(), ax.get_ylim()) == ((0, size[1]), (size[0], 0))


def test_attention_figure_takes_a_path_a_pil_image_and_a_normalised_tensor(biformer, images, tmp_path):
    from PIL import Image
    amap = attention_map(biformer, images, 'stages.2.blocks.3.attn', (40, 50))
    picture = Image.fromarray((torch.rand(INPUT[0], INPUT[1], 3) * 255).byte().numpy())
    picture.save(tmp_path / 'image.png')
    mean, std = biformer.pretrained_cfg['mean'], biformer.pretrained_cfg['std']
    drawn = []
    for image in (tmp_path / 'image.png', picture, images):
        figure = plot_attention(image, amap, head=1, mean=mean, std=std)
        ax = figure.axes[0]
        heat = [im for im in ax.images if im.get_gid() == 'attention']
        drawn.append((len(heat), heat[0].get_array().shape, ax.get_xlim(), ax.get_ylim()))
    assert drawn == [(1, (5, 7), (0, 100), (75, 0))] * 3


def test_visualize_draws_routing_and_attention_for_a_routed_layer(biformer, images):
    figure = visualize(biformer, images, (30, 40))
    assert [ax.get_title() for ax in figure.axes] == [
        '16 routed regions of the query region', 'routed attention, mean of the heads']


def test_visualize_takes_a_tensor_for_a_model_without_data_config(tmp_path):
    neck = nn.Sequential(nn.Conv2d(3, 32, 3, stride=4, padding=1), bra_layer()).eval()
    figure = visualize(neck, torch.rand(1, 3, 64, 80), (10, 70))
    with pytest.raises(ValueError, match=r'no pretrained_cfg .* pass the \(1, 3, H, W\) tensor'):
        visualize(neck, tmp_path / 'image.png', (10, 70))
    assert len(patches(figure, 'routed-')) == 3


# Grad-CAM (the grad-cam package) on the target layers README names


@pytest.mark.parametrize('name', ['biformer_tiny', 'crossformer_tiny'])
def test_grad_cam_runs_on_the_last_stage(name, biformer, crossformer, images):
    pytest.importorskip('pytorch_grad_cam')
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    model = biformer if name == 'biformer_tiny' else crossformer
    with GradCAM(model=model, target_layers=[model.stages[-1]]) as cam:
        heat = cam(input_tensor=images, targets=[ClassifierOutputTarget(3)])
    assert heat.shape == (1, *INPUT) and bool((heat >= 0).all() and (heat <= 1).all())


# the command line


@pytest.fixture
def image_file(tmp_path):
    from PIL import Image
    path = tmp_path / 'image.png'
    Image.fromarray((torch.rand(90, 120, 3) * 255).byte().numpy()).save(path)
    return path


def test_cli_viz_writes_the_figure(image_file, tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / 'fig.png'
    code = cli.main(['viz', 'biformer_tiny', str(image_file), '--query', '100,120', '--checkpoint',
                     str(tiny_checkpoint), '--layer', 'stages.1.blocks.1.attn', '--out', str(out)])
    assert code == 0 and out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    (['--query', '100,120', '--layer', 'attn'], "unknown layer 'attn' for BiFormer; valid names: 'stages.0.blocks.0"),
    (['--query', '300,10'], r'pass row in [0, 223]'),
    (['--query', '100'], '--query must be ROW,COL'),
    (['--query', '1,1', '--checkpoint', 'missing.pth'], 'missing.pth'),
])
def test_cli_viz_errors_are_one_line_with_exit_2(image_file, tmp_path, capsys, args, message):
    code = cli.main(['viz', 'biformer_tiny', str(image_file), '--out', str(tmp_path / 'fig.png'), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith('biformer-zoo viz: error: ') and message in err and err.count('\n') == 1


@pytest.mark.parametrize('content, message', [(None, 'is not a file'), (b'<html>', 'cannot read')])
def test_cli_viz_names_a_missing_or_unreadable_image(tmp_path, capsys, content, message):
    image = tmp_path / 'image.png'
    if content is not None:
        image.write_bytes(content)
    code = cli.main(['viz', 'biformer_tiny', str(image), '--query', '1,1', '--out', str(tmp_path / 'fig.png')])
    err = capsys.readouterr().err
    assert code == 2 and 'image.png' in err and message in err and not (tmp_path / 'fig.png').exists()
