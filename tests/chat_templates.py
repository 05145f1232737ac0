"""Chat templates for tests that need one the GGUF does not carry."""

# Gemma's turn format; the packaged Gemma 3 270M is the base model and its GGUF has no template.
GEMMA_TURNS = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = 'user' %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
