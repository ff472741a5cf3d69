"""Assemble the page: one column that reads top to bottom, image → mask → caption → preset → model → train.

Nothing here trains or decodes images; handlers live in the step modules and the trainer package.
"""
from __future__ import annotations

import secrets
from pathlib import Path

import gradio as gr

from trainer import api
from trainer.errors import UserError
from ui import (caption_step, compare_tab, dataset_step, grow_tab, image_set, schedule_step, set_step,
                settings_step, tryit_tab)
from ui.hosting import hosting_notices, on_space
from ui.image_cache import write_each_image_once
from ui.session import clear_errors, owner_and_token_of, user_errors
from ui import training_step
from ui.training_step import TrainingController

INTRO = """# One-image Flux LoRA
Train a Flux.1 LoRA from **a single image**. Two things make one image work: the background is **masked out of
the loss** (otherwise it is repeated in every step and shows up in every output), and **checkpoints are saved
often** so you can pick the one that learned the subject but still follows other prompts.
"""
IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".webp"]


def build_app(manager: api.JobManager, runs_root: Path, state_secret: str | None = None) -> gr.Blocks:
    write_each_image_once()  # the same picture sent to several outputs must not be rewritten under a browser's fetch
    controller = TrainingController(manager, runs_root)
    inference = api.InferenceService()  # one loaded base model, shared by Compare and Try it
    # A (re)started server: runs whose process died mid-training become "interrupted", offered for Resume.
    api.RunStore(runs_root).mark_interrupted(skip=manager.known_run_paths())
    api.start_temp_sweeper(Path(gr.utils.get_upload_folder()))  # empty files gr.File leaks on every upload
    presets = settings_step.preset_choices()
    first_preset = settings_step.first_preset(presets)  # the short CPU demo when there is no CUDA GPU
    rank0, steps0, lr0, every0 = settings_step.on_preset_change(first_preset)
    model0 = api.default_model()

    # Gradio's cache (uploads, outputs) is pruned daily and emptied on restart; run files live in runs_root.
    with gr.Blocks(title="One-image Flux LoRA", delete_cache=(3600, 24 * 3600)) as demo:
        owner_state = gr.BrowserState(None, storage_key="one-image-lora-owner", secret=state_secret)
        dataset_state, set_state = gr.State(None), gr.State(None)  # the image being edited; the set (ui.image_set)
        gr.Markdown(INTRO)
        if on_space():
            gr.LoginButton()  # on a Space, jobs belong to the logged-in user and their token fetches the model
        for warning in hosting_notices():
            gr.Markdown(warning)

        with gr.Tabs(selected="train") as tabs:
            with gr.Tab("Train", id="train"):
                gr.Markdown("## 1. Image")
                with gr.Row():
                    image_file = gr.File(label="Upload one image (PNG, JPEG, WEBP)", file_types=IMAGE_TYPES,
                                         type="filepath", elem_id="image-upload")
                    preview = gr.Image(label="What will be trained (dimmed = masked out)", interactive=False,
                                       type="pil", elem_id="mask-preview", height=360, buttons=["download"])
                image_info = gr.Markdown("Upload one image. A transparent PNG's transparency is used as its mask.",
                                         elem_id="image-info")
                strip, set_info, add_images, earlier, later, remove = set_step.build_strip()

                gr.Markdown("## 2. Mask")
                with gr.Row():
                    use_mask = gr.Checkbox(value=True, label="Mask the background (recommended: train the subject, not the background)")
                    mask_model = gr.Dropdown(choices=list(api.MASK_MODELS), value=api.default_mask_model(),
                                             label="Background-removal model",
                                             info="u2netp (the default) and u2net work offline; "
                                                  "the others download on first use")
                    mask_file = gr.File(label="Or upload your own mask (white = trained)", file_types=IMAGE_TYPES,
                                        type="filepath", elem_id="own-mask")
                gr.Markdown(dataset_step.MASK_HELP)
                bg0, norm0, unmasked0, augment0 = dataset_step.mask_defaults(first_preset)
                with gr.Row():
                    with gr.Column():
                        mask_threshold = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Threshold (0 = off)",
                                                   info="Binarise: gray at or above it becomes subject, below it background")
                        mask_softness = gr.Slider(0, 32, value=0, step=1, label="Soft edge (px)",
                                                  info="Feather the edge over this width, so it is trained in proportion")
                        mask_grow = gr.Slider(-32, 32, value=0, step=1, label="Grow (+) / shrink (−) (px)",
                                              info="Grow to keep thin details (a token is 16 px); shrink to drop a halo")
                    with gr.Column():
                        background_weight = gr.Slider(0.0, 1.0, value=bg0, step=0.05, label="Background weight",
                                                      info="0 = background never trained; ai-toolkit's floor is 0.1")
                        normalize_mask = gr.Checkbox(value=norm0, label="Normalise by mask area",
                                                     info="Same step size for a small or a large subject")
                        unmasked_probability = gr.Slider(0.0, 1.0, value=unmasked0, step=0.05,
                                                         label="Unmasked probability (share of whole-image steps)")
                        augment_probability = gr.Slider(0.0, 1.0, value=augment0, step=0.05,
                                                        label="Background augmentation (share of steps on other backgrounds)")
                        own_backgrounds = gr.File(
                            label=f"Your own backgrounds for augmentation (optional, up to {api.MAX_USER_BACKGROUNDS} photos)",
                            file_count="multiple", file_types=["image"], type="filepath", elem_id="own-backgrounds")
                gr.Markdown(dataset_step.LOSS_HELP)
                mask_editor = gr.ImageEditor(
                    label="Paint corrections: green adds to the subject, red removes", type="pil", image_mode="RGBA",
                    sources=(), transforms=(), layers=gr.LayerOptions(allow_additional_layers=False),
                    brush=gr.Brush(colors=["rgb(0, 200, 0)", "rgb(220, 0, 0)"], default_color="rgb(0, 200, 0)",
                                   color_mode="fixed"), elem_id="mask-editor", height=480)
                with gr.Row():
                    mask_full = gr.Image(label="Full-resolution mask (dimmed = not trained)", interactive=False,
                                         type="pil", elem_id="mask-full", height=400)
                    mask_tokens = gr.Image(label="What the trainer sees: one block = one Flux token (16×16 px)",
                                           interactive=False, type="pil", elem_id="mask-tokens", height=400)
                mask_info = gr.Markdown("", elem_id="mask-info")

                gr.Markdown("## 3. Caption and trigger word")
                caption = gr.Textbox(value=image_set.CAPTION_TEMPLATE, label="Caption",
                                     info="Describe everything in the image. [trigger] is replaced by the trigger word.",
                                     elem_id="caption")
                caption_length = caption_step.build(caption, set_state, dataset_state, strip, set_info, model0,
                                                    first_preset)
                with gr.Row():
                    trigger = gr.Textbox(value=caption_step.DEFAULT_TRIGGER, label="Trigger word", info="A rare word that will mean your subject")
                    prompts = gr.Textbox(value=settings_step.DEFAULT_PROMPTS, lines=3, label="Extra preview prompts (one per line)",
                                         info="Previews always include the caption itself; these test that other prompts still work")

                gr.Markdown("## 4. Preset")
                preset = gr.Dropdown(choices=presets, value=first_preset, label="Preset")
                with gr.Row():
                    rank = gr.Number(value=rank0, label="LoRA rank", precision=0, minimum=1, maximum=256)
                    steps = gr.Number(value=steps0, label="Steps", precision=0, minimum=1)
                    epochs = gr.Number(value=schedule_step.epochs_of(steps0, None, 1, 1), label="Epochs",
                                       info=schedule_step.EPOCHS_INFO, minimum=0.01, elem_id="epochs")
                    batch_size = gr.Number(value=1, label="Batch size", precision=0, minimum=1, maximum=16,
                                           info=schedule_step.BATCH_INFO, elem_id="batch-size")
                    learning_rate = gr.Number(value=lr0, label="Learning rate")
                    save_every = gr.Number(value=every0, label="Save a checkpoint every N steps", precision=0, minimum=1)
                schedule = gr.Markdown(schedule_step.schedule_note(steps0, every0, None, 1, 1, lr0), elem_id="schedule")
                plan = gr.Markdown(settings_step.on_plan_change(model0, rank0, steps0, every0, first_preset,
                                                                settings_step.DEFAULT_PROMPTS), elem_id="plan")

                gr.Markdown("## 5. Base model")
                model = gr.Dropdown(choices=settings_step.model_choices(), value=model0, allow_custom_value=True,
                                    label="Model: FLUX.1-dev, another Hub id, a local diffusers folder, or a built-in demo",
                                    elem_id="model")
                notice = gr.Markdown(settings_step.model_notice(model0), elem_id="model-notice")
                memory_tier = gr.Dropdown(choices=settings_step.memory_tier_choices(), value="auto",
                                          label="GPU memory tier", elem_id="memory-tier",
                                          info="Smaller tiers store the frozen model in 8 or 4 bits and recompute "
                                               "activations: they fit smaller cards and train slower")
                tier_notice = gr.Markdown(settings_step.memory_tier_notice("auto", model0), elem_id="tier-notice")
                # klein LoRAs train on the base model and are used on the distilled one: previews can show that.
                preview_model = gr.Dropdown(**settings_step.preview_model_options(model0), allow_custom_value=True,
                                            label="Previews drawn by", elem_id="preview-model",
                                            info="The distilled model (or a local folder of it) renders what users "
                                                 "of the LoRA will see, in 4 steps; it needs room for a second "
                                                 "transformer on the GPU (24 GB cards and up)")
                # One job on several GPUs: only offered when the job manager has several (one per CUDA GPU).
                several = manager.max_gpus > 1
                gpus = gr.Dropdown(choices=settings_step.gpus_choices(manager.max_gpus), value=1, visible=several,
                                   label="GPUs for this job", elem_id="gpus",
                                   info="Data parallel: the batch on each GPU, learning rate scaled by √(N × batch)")
                gpus_info = gr.Markdown(settings_step.gpus_note(1, lr0), visible=several, elem_id="gpus-note")
                api_preview_model = gr.Textbox(value="", visible=False)  # /train: "" = the base model
                api_gpus = gr.Number(value=1, precision=0, visible=False)  # /train: any number, checked by the controller
                api_batch, api_epochs, api_no_epochs = (gr.Number(value=None, visible=False) for _ in range(3))

                gr.Markdown("## 6. Train")
                with gr.Row():
                    train_btn = gr.Button("Train", variant="primary", elem_id="train")
                    stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
                    resume_btn = gr.Button("Resume interrupted run", visible=False, elem_id="resume")
                progress = gr.Markdown("", elem_id="progress")
                # The /train API's own inputs for the settings a preset fills in (no value: a call that leaves one
                # out gets the named preset's, not the first preset's that the page's controls start with).
                api_train = gr.Button(visible=False)
                api_point = gr.Button(visible=False)  # /subject_point: the API's click on the subject
                api_point_x, api_point_y = (gr.Number(value=None, visible=False) for _ in range(2))
                api_rank, api_steps, api_lr, api_every, api_background_weight, api_unmasked, api_augment = (
                    gr.Number(value=None, visible=False) for _ in range(7))
                api_normalize = gr.Dropdown(choices=[True, False], value=None, visible=False)
                loss_plot = gr.LinePlot(x="step", y="loss", title="Loss", height=220)
                # 3 columns: the caption + the 2 default prompts, so each row is one checkpoint.
                gallery = gr.Gallery(label="Previews (same seed at every checkpoint; step 0 is the base model)",
                                     columns=3, height="auto", elem_id="previews")
                checkpoints = gr.File(label="Checkpoints (.safetensors, diffusers/peft layout)", file_count="multiple",
                                      interactive=False, elem_id="checkpoints")
            compare = compare_tab.build(runs_root, inference, owner_state)
            tryit = tryit_tab.build(runs_root, inference, owner_state)
            grow = grow_tab.build()
        tryit_tab.connect_to_compare(compare, tryit, tabs)

        # ---- wiring: the data flows one way, upload → dataset → config → job → events → page
        dataset_inputs = [image_file, mask_file, use_mask, mask_model, set_state, caption, dataset_state]
        # (+ the set and the live dataset: a switch echoes the upload, answered without a new mask)
        dataset_outputs = [dataset_state, preview, image_info]
        # The upload handler is also the API's first call: it fills this session's dataset for /train.
        # Then the mask step: a new base mask clears the painted strokes and applies the controls to it.
        new_mask = dict(fn=set_step.new_mask_if_fresh, api_name=False, concurrency_limit=2,
                        inputs=[dataset_state, mask_threshold, mask_softness, mask_grow, preset, background_weight],
                        outputs=[dataset_state, preview, mask_editor, mask_full, mask_tokens, mask_info])
        refresh_set = dict(fn=set_step.refresh, inputs=set_state, outputs=[strip, set_info], api_name=False)
        caption_reset = gr.State(None)  # a new picture's caption (set_step.on_source_change), written into the box
        for trigger_event, name in ((image_file.change, "prepare_dataset"), (mask_file.change, False),
                                    (use_mask.change, False), (mask_model.change, False)):
            trigger_event(set_step.on_source_change, dataset_inputs, [*dataset_outputs, set_state, caption_reset],
                          api_name=name, concurrency_limit=2).then(**new_mask).then(**refresh_set).then(
                lambda text: gr.skip() if text is None else text, caption_reset, caption, api_name=False)
        editor = set_step.Editor(set_state, dataset_state, preview, image_info, image_file, mask_file, use_mask,
                                 mask_model, mask_threshold, mask_softness, mask_grow, mask_editor, mask_full,
                                 mask_tokens, mask_info, caption, preset, background_weight, strip, set_info)
        follow_set = schedule_step.connect(steps, epochs, batch_size, gpus, set_state, save_every, learning_rate,
                                           schedule)
        set_step.connect(editor, add_images, earlier, later, remove, then=follow_set)
        grow_tab.connect(grow, api.RunStore(runs_root), inference, owner_state, editor, trigger, tabs, then=follow_set)
        # A click on the preview says where the subject is: the automatic mask looks for it there.
        @user_errors
        def on_preview_click(dataset, mask_model_, evt: gr.SelectData):
            return dataset_step.on_subject_point(dataset, mask_model_, *evt.index[:2])

        @user_errors
        def on_api_point(dataset, mask_model_, x, y):  # /subject_point: x, y in the image's own pixels
            return dataset_step.on_subject_point(dataset, mask_model_, x, y, display_pixels=False)

        preview.select(on_preview_click, [dataset_state, mask_model], dataset_outputs, api_name=False,
                       concurrency_limit=2).then(**new_mask)
        api_point.click(on_api_point, [dataset_state, mask_model, api_point_x, api_point_y], dataset_outputs,
                        api_name="subject_point", concurrency_limit=2).then(**new_mask)
        mask_view_inputs = [dataset_state, mask_threshold, mask_softness, mask_grow, mask_editor, preset,
                            background_weight]
        mask_view_outputs = [dataset_state, preview, mask_full, mask_tokens, mask_info]
        for control in (mask_threshold, mask_softness, mask_grow, mask_editor, background_weight):
            control.change(dataset_step.on_mask_adjust, mask_view_inputs, mask_view_outputs, api_name=False,
                           concurrency_limit=2, trigger_mode="always_last")
        # .input, not .change: only the user's own choice of preset (or model) fills the boxes below with its values;
        # a reloaded page setting the running job's preset and settings must not have them reset to the preset's.
        preset.input(dataset_step.mask_defaults, preset,
                     [background_weight, normalize_mask, unmasked_probability, augment_probability], api_name=False)

        preset.input(settings_step.on_preset_change, preset, [rank, steps, learning_rate, save_every], api_name=False)
        for box in (rank, steps, save_every, model, preset, prompts):
            box.change(settings_step.on_plan_change, [model, rank, steps, save_every, preset, prompts], plan,
                       api_name=False)
        caption_step.connect_length(caption_length, caption, trigger, model, preset)
        model.change(settings_step.model_notice, model, notice, api_name=False)
        model.input(lambda m: gr.update(**settings_step.preview_model_options(m)), model, preview_model,
                    api_name=False)
        for box in (memory_tier, model):
            box.change(settings_step.memory_tier_notice, [memory_tier, model], tier_notice, api_name=False)
        for box in (gpus, learning_rate, batch_size):
            box.change(settings_step.gpus_note, [gpus, learning_rate, batch_size], gpus_info, api_name=False)

        loss_axis = gr.State(None)  # the job's x range for the loss plot (whole steps: RunView.loss_axis)
        loss_axis.change(lambda axis: gr.update(x_lim=axis), loss_axis, loss_plot, api_name=False)
        stream_outputs = [progress, loss_plot, gallery, checkpoints, train_btn, stop_btn, loss_axis]

        def start(stored, dataset, caption_, trigger_, prompts_, preset_, rank_, steps_, lr_, every_, model_,
                  background_weight_, normalize_, unmasked_, augment_, memory_tier_,
                  request: gr.Request, profile: gr.OAuthProfile | None = None,
                  oauth_token: gr.OAuthToken | None = None,
                  gpus_=1, backgrounds_=None, preview_model_="", batch_=None, epochs_=None, images_=None):  # the inputs after memory_tier (gradio slots request/profile/token in
                                                 # by their type)
            owner, token = owner_and_token_of(stored, request, profile, oauth_token)
            try:
                if dataset is None:
                    raise UserError(image_set.no_image_message(images_))  # why: a refused upload, or none yet
                message = controller.start(owner, dataset, caption_, trigger_, prompts_, preset_, rank_, steps_,
                                           lr_, every_, model_, token=token,
                                           loss_settings=dataset_step.loss_settings(
                                               background_weight_, normalize_, unmasked_, augment_),
                                           memory_tier=memory_tier_, gpus=gpus_, backgrounds=backgrounds_,
                                           preview_model=preview_model_, batch_size=batch_, epochs=epochs_,
                                           images=image_set.training_images(images_, dataset, caption_),
                                           lineage=image_set.lineage_of(images_))
            except UserError as err:
                raise gr.Error(str(err), print_exception=False) from None
            return message, gr.update(interactive=False), gr.update(interactive=True)

        def follow(stored, request: gr.Request, profile: gr.OAuthProfile | None = None):
            owner, _ = owner_and_token_of(stored, request, profile)
            yield from controller.follow(owner)

        def stop(stored, request: gr.Request, profile: gr.OAuthProfile | None = None):
            owner, _ = owner_and_token_of(stored, request, profile)
            return controller.stop(owner)

        def offer_resume(stored, request: gr.Request, profile: gr.OAuthProfile | None = None):
            owner, _ = owner_and_token_of(stored, request, profile)
            return gr.update(visible=controller.resumable_run(owner) is not None)

        def resume(stored, request: gr.Request, profile: gr.OAuthProfile | None = None,
                   oauth_token: gr.OAuthToken | None = None):
            owner, token = owner_and_token_of(stored, request, profile, oauth_token)
            try:
                message = controller.resume(owner, token=token)
            except UserError as err:
                raise gr.Error(str(err), print_exception=False) from None
            return message, gr.update(interactive=False), gr.update(interactive=True), gr.update(visible=False)

        def init_owner(stored):
            return stored or secrets.token_urlsafe(18)

        def job_settings(stored, request: gr.Request, profile: gr.OAuthProfile | None = None):
            return training_step.settings_updates(controller.job_settings(owner_and_token_of(stored, request,
                                                                                             profile)[0]))
        settings_boxes = dict(preset=preset, caption=caption, trigger=trigger, prompts=prompts, rank=rank, steps=steps,
                              learning_rate=learning_rate, save_every=save_every, batch_size=batch_size, model=model,
                              memory_tier=memory_tier, gpus=gpus, preview_model=preview_model,
                              background_weight=background_weight, normalize_mask=normalize_mask,
                              unmasked_probability=unmasked_probability, augment_probability=augment_probability)

        train_btn.click(
            start, [owner_state, dataset_state, caption, trigger, prompts, preset, rank, steps, learning_rate,
                    save_every, model, background_weight, normalize_mask, unmasked_probability, augment_probability,
                    memory_tier, gpus, own_backgrounds, preview_model, batch_size, api_no_epochs, set_state],
            [progress, train_btn, stop_btn], api_name=False, concurrency_limit=None,
        ).success(follow, owner_state, stream_outputs, api_name="follow", concurrency_limit=None)

        def start_api(stored, dataset, caption, trigger, prompts, preset, rank=None, steps=None, learning_rate=None,
                      save_every=None, model=None, background_weight=None, normalize_mask=None,
                      unmasked_probability=None, augment_probability=None, memory_tier="auto", gpus=1,
                      backgrounds=None, preview_model="", batch_size=None, epochs=None, images=None,
                      request: gr.Request = None,
                      profile: gr.OAuthProfile | None = None, oauth_token: gr.OAuthToken | None = None):
            # The page's inputs in the page's order; a preset setting left out (None) is the named preset's.
            return start(stored, dataset, caption, trigger, prompts, preset, rank, steps, learning_rate, save_every,
                         model, background_weight, normalize_mask, unmasked_probability, augment_probability,
                         memory_tier, request, profile, oauth_token, gpus, backgrounds, preview_model, batch_size,
                         epochs, images)

        # /train for API clients: gradio_client fills a left-out input with its component's initial value, which
        # for the page's controls is the first preset's; these inputs have none.
        api_train.click(
            start_api, [owner_state, dataset_state, caption, trigger, prompts, preset, api_rank, api_steps, api_lr,
                        api_every, model, api_background_weight, api_normalize, api_unmasked, api_augment,
                        memory_tier, api_gpus, own_backgrounds, api_preview_model, api_batch, api_epochs, set_state],
            [progress, train_btn, stop_btn], api_name="train", concurrency_limit=None)
        stop_btn.click(stop, owner_state, progress, api_name="stop", concurrency_limit=None)
        resume_btn.click(resume, owner_state, [progress, train_btn, stop_btn, resume_btn], api_name="resume",
                         concurrency_limit=None,
                         ).success(follow, owner_state, stream_outputs, api_name=False, concurrency_limit=None)
        # A red "Error" (a Train refused, an add or a caption that failed) goes when the user acts on its cause.
        clear_errors([image_file.change, mask_file.change, own_backgrounds.change, strip.select,
                      *(box.input for box in (caption, trigger, prompts, preset, rank, steps, epochs, batch_size,
                                              learning_rate, save_every, model, memory_tier, gpus, preview_model))],
                     [progress])
        clear_errors([image_file.change, caption.input], [caption, strip, set_info, preview, image_info, use_mask,
                                                          mask_model, mask_threshold, mask_softness, mask_grow,
                                                          mask_editor, mask_full, mask_tokens, mask_info])
        demo.load(offer_resume, owner_state, resume_btn, api_name=False)
        # A reloaded page finds the browser's id in local storage and re-attaches to its job, showing its settings.
        demo.load(init_owner, owner_state, owner_state, api_name=False).then(
            job_settings, owner_state, [settings_boxes[name] for name in training_step.SETTINGS], api_name=False).then(
            follow, owner_state, stream_outputs, api_name=False, concurrency_limit=None)
    return demo
