"""Small .mix sources the tests write to disk: one tiny CNN, shaped per test, and a small WRN."""


def tiny_cnn(
    input_: str,
    classes: int,
    train: str,
    stem: str = "conv stem(4, kernel = 3)",
    ensemble_extra: str = "",
) -> str:
    """Three 4-wide convs and a classifier; 2 members at 2.0x (at 1.0x the two same-shape convs
    would share one template and the members would be identical)."""
    return f"""
backbone tiny(classes = {classes}) {{
    input {input_}
    {stem}
    bn; relu
    conv c1(4, kernel = 3)
    bn; relu
    conv c2(4, kernel = 3)
    bn; relu
    global_avgpool
    linear fc(classes)
}}
ensemble {{
    backbone tiny(classes = {classes})
    members 2
    budget 2.0x
    groups by_shape
{ensemble_extra}}}
train {{
{train}}}
"""


#: a small Wide ResNet (depth 10, width 2, 32x32 images, 10 classes), 4 members: big enough that
#: activations and weights both matter (the BatchEnsemble memory tests)
SMALL_WRN = """import "blocks/wide.mix"
ensemble {
    backbone wrn(depth = 10, k = 2, classes = 10)
    members 4
}
"""


def small_wrn_plan(method: str):
    """SMALL_WRN compiled under ``method`` (the zoo's blocks on the import path)."""
    from paths import ZOO

    import mixc

    return mixc.compile_text(
        SMALL_WRN, [f"method={method}"], name="wrn10_2.mix", import_paths=[ZOO]
    )
