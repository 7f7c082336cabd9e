"""The Jinja template of an aligner's model card (`README.md`), filled in by `hf_align.model.card.generate_model_card`.

Kept apart from the code that fills it in: it is text, edited as a document.
"""

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A CLIP-style image–text model built with `hf_align`: the frozen vision encoder \
{{ vision.link }} and the frozen text encoder {{ text.link }}, joined by a small trained `{{ method }}` aligner\
{% if train_pairs %} fitted on {{ train_pairs }} image–text pairs{% endif %}. Only the aligner's weights live in \
this repository; the encoders are loaded from their own repositories at the pinned revisions below\
{% if bundled %} (a copy of each is also bundled under `vision_encoder/` and `text_encoder/` for offline \
use){% endif %}.

## Model details

| | Vision | Text |
|---|---|---|
| Encoder | {{ vision.link }} | {{ text.link }} |
| Revision | {{ vision.revision }} | {{ text.revision }} |
| Layer (hidden-state index) | {{ vision.layer }} | {{ text.layer }} |
| Features read | {{ vision.features }} | {{ text.features }} |
| Feature width | {{ vision.width }} | {{ text.width }} |

- **Aligner method:** `{{ method }}`{% if method_settings %} with {{ method_settings }}{% endif %}
- **Regularisers:** {{ regularizers if regularizers else "none" }}
- **Similarity head:** `{{ similarity }}`{% if similarity_settings %} with {{ similarity_settings }}{% endif %}
- **Temperature:** {{ temperature }}{% if learnable_temperature %} (learned){% endif %}
- **Embedding dimension:** {{ embed_dim }}
- **Trainable aligner parameters:** {{ num_parameters }}
{% if layer_selection %}
## Layer selection

{{ layer_selection }}
{% endif %}
## Usage

```bash
pip install hf_align
```

```python
import torch
from PIL import Image
from transformers import pipeline

import hf_align  # registers the aligner classes with transformers

model = hf_align.AlignerModel.from_pretrained("{{ model_id }}")
processor = hf_align.AlignerProcessor.from_pretrained("{{ model_id }}")
inputs = processor(images=Image.open("photo.jpg"), text=["a photo of a cat", "a photo of a dog"])
with torch.no_grad():
    probs = model(**inputs).logits_per_image.softmax(dim=-1)

# embeddings for search: (n, {{ embed_dim }}) L2-normalised tensors
image_embeds = model.get_image_features(pixel_values=inputs["pixel_values"])

# or the stock zero-shot pipeline
classifier = pipeline("zero-shot-image-classification", model="{{ model_id }}")
classifier("photo.jpg", candidate_labels=["cat", "dog"])
```

From sentence-transformers (after `import hf_align`), `SentenceTransformer("{{ model_id }}").encode(...)` of captions
or PIL images gives these same embeddings, so vector databases and frameworks built on it can index them; open_clip
style: `model, preprocess, tokenizer = hf_align.create_model_and_transforms("{{ model_id }}")`.
{% if evaluations %}
## Evaluation
{% for run in evaluations %}
### {{ run.task_name }}: {{ run.dataset }}

{% if run.details %}{{ run.details }}

{% endif %}| Metric | Value |
|---|---|
{% for name, value in run.metrics %}| {{ name }} | {{ value }} |
{% endfor %}{% endfor %}{% endif %}
## Training details
{% if train_datasets %}
### Training data

| Dataset | Split | Rows |
|---|---|---|
{% for dataset in train_datasets %}| {{ dataset.label }} | {{ dataset.split }} | {{ dataset.num_rows }} |
{% endfor %}{% endif %}{% if training %}
### Training run

| | |
|---|---|
{% for name, value in training %}| {{ name }} | {{ value }} |
{% endfor %}{% endif %}{% if hyperparameters %}
### Non-default hyperparameters

| Argument | Value |
|---|---|
{% for name, value in hyperparameters %}| `{{ name }}` | `{{ value }}` |
{% endfor %}{% endif %}{% if final_eval %}
### Validation metrics (held-out training pairs, final weights)

| Metric | Value |
|---|---|
{% for name, value in final_eval %}| {{ name }} | {{ value }} |
{% endfor %}{% endif %}{% if training_logs %}
### Training logs

| Epoch | Step | Training loss | Validation loss |
|---|---|---|---|
{% for row in training_logs %}| {{ row.epoch }} | {{ row.step }} | {{ row.training_loss }} | {{ row.validation_loss }} |
{% endfor %}{% endif %}{% if not (train_datasets or training) %}
This aligner has not been trained with `hf_align.train` or \
`transformers.Trainer` + `hf_align.CardDataCallback`; no training record is available.
{% endif %}
## Framework versions

{% for name, version in versions %}- {{ name }}: {{ version }}
{% endfor %}{% if citations %}
## Citation

{{ citations.sentence }}

```bibtex
{{ citations.bibtex }}
```
{% endif %}"""

__all__ = ["TEMPLATE"]
