"""The model: GALIP's networks on a frozen CLIP, and nothing about data, training loops or services.

``clip`` builds the frozen CLIP and the views of it GALIP uses (text features, the image features D
reads, the ViT blocks G's mapper runs); ``models`` holds NetG, NetD and NetC, sized from the CLIP's
own config; ``losses`` the pure tensor-to-scalar losses of the D and G phases; ``precision`` the
autocast/GradScaler policy; ``summary`` the parameter counts; ``model_configs/`` the project's own
open_clip configs (``galip-tiny``), which ``clip.register_project_model_configs`` registers.
"""
