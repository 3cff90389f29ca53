from .mobilenetv2 import MobileNetV2, load_mobilenetv2

__all__ = ["MobileNetV2", "load_mobilenetv2"]
