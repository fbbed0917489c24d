"""Train a YOLO detector with Bi-Level Routing Attention, then reload, predict and export it.

Needs the optional extra (Ultralytics is AGPL-3.0): ``pip install "biformer-zoo[yolo]"``. ``coco8.yaml`` is a
dataset Ultralytics downloads on first use; pass any YOLO-format data YAML instead::

    python examples/yolo_bra.py --model yolov8n-bra.yaml --data coco8.yaml --epochs 3 --imgsz 320
"""
import argparse

from ultralytics import YOLO

from biformer_zoo.integrations.ultralytics import list_model_cfgs, model_cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='yolov8n-bra.yaml',
                        help=f'a shipped YAML with a scale letter (n/s/m/l/x), from {list_model_cfgs()}')
    parser.add_argument('--data', default='coco8.yaml')
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--imgsz', type=int, default=320)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--project', default='runs/biformer_zoo')
    args = parser.parse_args()

    model = YOLO(model_cfg(args.model))  # prints the layer table: BRA after SPPF, C2fBRA at P5
    model.train(data=args.data, epochs=args.epochs, imgsz=args.imgsz, device=args.device, project=args.project,
                name=args.model.removesuffix('.yaml'))
    best = YOLO(model.trainer.best)  # a checkpoint needs only this package installed, in any process
    best.predict(source=model.trainer.validator.dataloader.dataset.im_files[:2], imgsz=args.imgsz, save=True)
    print('exported:', best.export(format='onnx', imgsz=args.imgsz))


if __name__ == '__main__':
    main()
