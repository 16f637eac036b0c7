"""The page: Generate, Train and Runs tabs in Gradio (the field's convention: A1111, kohya_ss and fluxgym).

Event handlers are thin: they call ``Page`` (ui/page.py), which calls the api and the job queue, and show a
``ConceptorError`` as one line in the tab's status box. Element ids (``#prompt``, ``#start`` ...) are the
contract the browser tests drive. The page uses few component kinds (numbers, not sliders; the loss curve
as an image; tables as HTML): Gradio loads the scripts of every kind in the page before it shows anything,
so each kind costs the first view time (benchmarks/ui_speed.py).
"""
from __future__ import annotations

from .page import Page

CSS = """
#embeddings .gallery-item, #loras .gallery-item {font-family: monospace}
#job-progress .bar {height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden}
#job-progress .bar > div {height: 100%; background: #2563eb}
#queue table {width: 100%; border-collapse: collapse} #queue td, #queue th {padding: 2px 8px; text-align: left}
#run-config textarea, #eval-out textarea, #gen-info textarea {font-family: monospace}
"""


def build(page: Page):
    import gradio as gr

    from ..methods import specs
    from ..models.pipeline import SCHEDULERS

    models = page.model_choices()
    with gr.Blocks(title="conceptor") as demo:
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    model = gr.Dropdown(models, value=models[0] if models else None, label="model", elem_id="model",
                                        scale=4)
                    refresh = gr.Button("refresh lists", elem_id="refresh", scale=1)
                prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt",
                                    placeholder="a photo of a <token>   (LoRAs: <lora:NAME:0.8>)")
                negative = gr.Textbox(label="negative prompt", elem_id="negative")
                with gr.Row():
                    tokens = gr.Dataset(components=[gr.Textbox(visible=False)], samples=page.token_samples(),
                                        label="embeddings (click to insert)", elem_id="embeddings", samples_per_page=40)
                    loras = gr.Dataset(components=[gr.Textbox(visible=False)], samples=page.lora_samples(),
                                       label="LoRAs (click to insert)", elem_id="loras", samples_per_page=40)
                with gr.Row():
                    sampler = gr.Dropdown(list(SCHEDULERS), value="ddim", label="sampler", elem_id="sampler")
                    steps = gr.Number(30, precision=0, minimum=1, label="steps", elem_id="steps")
                    guidance = gr.Number(None, label="guidance (0: the model's)", elem_id="guidance")
                    seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                with gr.Row():
                    width = gr.Number(None, precision=0, label="width (0: the model's)", elem_id="width")
                    height = gr.Number(None, precision=0, label="height", elem_id="height")
                    count = gr.Number(1, precision=0, minimum=1, maximum=64, label="images", elem_id="count")
                    go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                gallery = gr.Gallery(label="images", elem_id="gallery", columns=4, height="auto")
                gen_info = gr.Textbox(label="settings (written into each PNG, A1111 'parameters')", lines=3,
                                      elem_id="gen-info", interactive=False)

            with gr.Tab("Train", id="train"):
                with gr.Row():
                    method = gr.Dropdown([s.name for s in specs()], value="textual-inversion", label="method",
                                         elem_id="method")
                    train_model = gr.Dropdown(models, value=models[0] if models else None, label="base model",
                                              elem_id="train-model")
                uploads = gr.File(file_count="multiple", file_types=["image", ".txt"], label="images (+ .txt captions)",
                                  elem_id="upload")
                folder = gr.Textbox(label="or a folder / dataset under the data folder", elem_id="folder")
                with gr.Row():
                    token = gr.Textbox(label="token (textual inversion)", placeholder="<my-thing>", elem_id="token")
                    init_word = gr.Textbox(label="init word", placeholder="object", elem_id="init-word")
                    instance = gr.Textbox(label="instance prompt (DreamBooth)", placeholder="a photo of sks toy",
                                          elem_id="instance-prompt")
                    class_prompt = gr.Textbox(label="class prompt (prior preservation)", placeholder="a photo of a toy",
                                              elem_id="class-prompt")
                with gr.Row():
                    train_steps = gr.Number(500, precision=0, label="steps", elem_id="train-steps")
                    lr = gr.Number(None, label="learning rate (0: the method's)", elem_id="lr")
                    resolution = gr.Number(None, precision=0, label="resolution (0: the model's)",
                                           elem_id="resolution")
                    lora = gr.Checkbox(False, label="LoRA", elem_id="lora")
                    rank = gr.Number(4, precision=0, label="LoRA rank", elem_id="rank")
                    adapter = gr.Dropdown(["lora", "dora", "loha", "lokr"], value="lora", label="adapter",
                                          elem_id="adapter")
                with gr.Accordion("advanced", open=False):
                    with gr.Row():
                        vectors = gr.Number(1, precision=0, label="vectors per token", elem_id="vectors")
                        batch = gr.Number(None, precision=0, label="batch size (0: the method's)", elem_id="batch-size")
                        train_seed = gr.Number(0, precision=0, label="seed", elem_id="train-seed")
                        precision = gr.Dropdown(["no", "fp16", "bf16"], value="no", label="mixed precision",
                                                elem_id="mixed-precision")
                    with gr.Row():
                        validation = gr.Textbox(label="validation prompt", elem_id="validation-prompt")
                        validation_every = gr.Number(None, precision=0, label="grid every N steps (0: 4 per run)",
                                                     elem_id="validation-every")
                        checkpoint_every = gr.Number(None, precision=0, label="checkpoint every N steps (0: 5 per run)",
                                                     elem_id="checkpoint-every")
                        name = gr.Textbox(label="run name", elem_id="run-name")
                start = gr.Button("Start training", variant="primary", elem_id="start")
                train_msg = gr.Textbox(label="status", interactive=False, elem_id="train-msg")
                queue = gr.HTML(page.queue_html(), label="queue", elem_id="queue")
                with gr.Row():
                    job = gr.Dropdown(page.job_choices(), value=None, label="job", elem_id="job", scale=4)
                    cancel = gr.Button("Cancel job", variant="stop", elem_id="cancel", scale=1)
                job_progress = gr.HTML(elem_id="job-progress")
                with gr.Row():
                    loss_plot = gr.Image(label="training loss", elem_id="loss", interactive=False)
                    grids = gr.Gallery(label="validation grids", elem_id="grids", columns=2, height=300)
                job_log = gr.Textbox(label="log (last line)", interactive=False, elem_id="job-log")
                timer = gr.Timer(1.0)

            with gr.Tab("Runs", id="runs"):
                with gr.Row():
                    run = gr.Dropdown(page.run_choices(), value=None, label="run", elem_id="run", scale=4)
                    run_refresh = gr.Button("refresh", elem_id="run-refresh", scale=1)
                run_summary = gr.Textbox(label="summary", interactive=False, elem_id="run-summary")
                run_config = gr.Textbox(label="config.yaml", lines=12, max_lines=30, interactive=False,
                                        elem_id="run-config")
                with gr.Row():
                    evaluate = gr.Button("Evaluate (toy world)", elem_id="eval")
                    eval_out = gr.Textbox(label="conceptor eval", lines=6, interactive=False, elem_id="eval-out")
                run_files = gr.File(label="files", file_count="multiple", interactive=False, elem_id="run-files")
                with gr.Row():
                    convert_src = gr.Dropdown([], label="file to convert", elem_id="convert-file")
                    convert_to = gr.Dropdown(["diffusers", "a1111", "kohya"], value="a1111", label="to",
                                             elem_id="convert-to")
                    convert = gr.Button("Convert", elem_id="convert")
                convert_out = gr.File(label="converted", interactive=False, elem_id="convert-out")
                run_msg = gr.Textbox(label="status", interactive=False, elem_id="run-msg")

        # -- Generate --------------------------------------------------------------------------------
        def lists():
            choices = page.model_choices()
            return (gr.Dropdown(choices=choices), gr.Dropdown(choices=choices),
                    gr.Dataset(samples=page.token_samples()), gr.Dataset(samples=page.lora_samples()),
                    gr.Dropdown(choices=page.run_choices()))

        refresh.click(lists, None, [model, train_model, tokens, loras, run], queue=False)
        tokens.click(page.insert, [tokens, prompt], prompt, queue=False)
        loras.click(page.insert, [loras, prompt], prompt, queue=False)
        go.click(page.generate, [model, prompt, negative, sampler, steps, guidance, seed, width, height, count],
                 [gallery, gen_info], concurrency_limit=1, concurrency_id="model", api_name="generate",
                 show_progress="minimal")

        # -- Train -----------------------------------------------------------------------------------
        form = [method, train_model, folder, uploads, token, init_word, instance, class_prompt, train_steps, lr,
                resolution, lora, rank, vectors, batch, validation, validation_every, checkpoint_every, train_seed,
                precision, name, adapter]
        start.click(page.start, form, [train_msg, job, uploads], concurrency_limit=4)
        cancel.click(page.cancel, job, train_msg, queue=False)

        seen = gr.State({})  # what this browser shows now: only what changed is sent (a redraw costs CPU)

        def watch(selected, shown_before):
            rows, choices = page.queue_html(), page.job_choices()
            shown = selected if selected in choices else (choices[0] if choices else None)
            view = page.job_view(shown)
            now = {"rows": rows, "choices": (choices, shown), "html": view["html"], "loss": view["loss"],
                   "grids": view["grids"], "log": view["log"]}
            same = {k: shown_before.get(k) == v for k, v in now.items()}
            values = (rows, gr.Dropdown(choices=choices, value=shown), view["html"], view["loss"], view["grids"],
                      view["log"])
            return (*(gr.skip() if same[k] else v for k, v in zip(now, values)), now)

        outputs = [queue, job, job_progress, loss_plot, grids, job_log, seen]
        timer.tick(watch, [job, seen], outputs, queue=False, show_progress="hidden")
        job.change(lambda selected: watch(selected, {}), job, outputs, queue=False, show_progress="hidden")

        # -- Runs ------------------------------------------------------------------------------------
        run_refresh.click(lambda: gr.Dropdown(choices=page.run_choices()), None, run, queue=False)

        def show_run(label):
            view = page.run_view(label)
            return (view["summary"], view["config"], view["files"], gr.Dropdown(choices=view["convertible"],
                    value=view["convertible"][0] if view["convertible"] else None), view["message"])

        run.change(show_run, run, [run_summary, run_config, run_files, convert_src, run_msg])
        evaluate.click(page.evaluate, run, [eval_out, run_msg], concurrency_limit=1, concurrency_id="model")
        convert.click(page.convert, [run, convert_src, convert_to], [convert_out, run_msg])
    return demo, CSS
