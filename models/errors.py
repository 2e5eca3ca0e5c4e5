"""Domain errors raised by the models package; the CLI and the service map them to messages."""


class ImgsimError(Exception):
    """Base class: the message is a complete sentence a person can act on."""


class UnsupportedImage(ImgsimError):
    """The bytes are not an image we can decode (not an image, truncated, empty)."""


class ImageTooLarge(UnsupportedImage):
    """The image has more pixels (or bytes) than we are willing to decode."""


class WeightsUnavailable(ImgsimError):
    """Pretrained weights were asked for but cannot be loaded."""


class DatasetError(ImgsimError):
    """A folder of images cannot be used as asked (missing, empty, one class...)."""


class BundleError(ImgsimError):
    """A model bundle is missing, incomplete or inconsistent."""


class UnsupportedFormat(UnsupportedImage):
    """The file is an image, but of a format we do not accept (EPS, PSD, ICO...)."""


class AspectRatioTooLarge(UnsupportedImage):
    """The image is so much longer than wide that scaling it to the model's size would not fit."""
