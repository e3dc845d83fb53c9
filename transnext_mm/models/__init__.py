from .backbones import TransNeXt

__all__ = ['TransNeXt']
