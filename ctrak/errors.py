"""Named errors. Each says what is wrong and how to fix it; none of them ever corrects input."""


class CtrakError(Exception):
    """Base class of every error ctrak raises on bad input or a mismatched artifact."""


class ModelLoadError(CtrakError):
    """The model directory is missing a component, or holds one we will not load."""


class ImageShapeError(CtrakError):
    """Images have the wrong size, channel count or value range for the model."""


class PromptError(CtrakError):
    """A prompt is empty or not a string."""


class ConceptNotInPromptError(CtrakError):
    """The target concept does not occur in the prompt and no negative prompt was given."""


class ConfigError(CtrakError):
    """A configuration value is out of range (k <= 0, a timestep off the grid, ...)."""


class NumericsError(CtrakError):
    """A gradient is NaN/Inf or has zero norm at a timestep, so it cannot be normalised."""


class SampleDecodeError(CtrakError):
    """A training sample cannot be read: no image member, several, or an image that does not
    decode; the message names the shard, the key and the reason featurize would reject it for."""


class LabelError(ConfigError):
    """A labelled set's `.json` lacks an attribute key named by --labels, or the labels leave
    nothing to evaluate (one value per attribute, no rows)."""


class CaptionTemplateError(ConfigError):
    """The query prompt of a label combination cannot be read from the data's captions (the
    captions do not contain the label values, or follow more than one wording), or an explicit
    --caption-template does not name exactly the attributes."""


class ConceptNotLearnedError(CtrakError):
    """The model draws an attribute value right less often than the threshold on its trained
    combinations (the concept check): attributing that concept would measure nothing."""
