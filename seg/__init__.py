"""seg: image segmentation models, data, losses, metrics and training built on minidl."""
