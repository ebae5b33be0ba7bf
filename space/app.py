"""omni-zoo's voice chat page as a Hugging Face Space (space/README.md says how to deploy it).
The page is webui/gradio_chat.py's with a public page's rules, built by webui/space.py, whose
docstring lists the Space's variables (OMNI_ZOO_MODEL, ...). Locally: ``python space/app.py --tiny``."""
import os
import sys
from pathlib import Path

# the model(s) this Space was built for (space/build.py --model); the Space's OMNI_ZOO_MODEL wins
os.environ.setdefault("OMNI_ZOO_MODEL", "mini-omni")

HERE = Path(__file__).resolve().parent
# in the Space the zoo, serving and webui packages sit beside this file; in the repository, one up
sys.path.insert(0, str(HERE if (HERE / "zoo").is_dir() else HERE.parent))

from webui.space_env import import_spaces_first, use_persistent_hub_cache  # noqa: E402

import_spaces_first()  # ZeroGPU: before torch
use_persistent_hub_cache()  # before huggingface_hub reads HF_HOME

from webui.space import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
