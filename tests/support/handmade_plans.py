"""Plans built by hand for the backend tests, independent of the compiler.

``PlanBuilder`` infers shapes, assigns templates with the cyclic counter of
docs/allocation.md ("The rules") and fills in tensors and accounting, so
the backend can be tested on graphs the zoo does not have (1-D convs, grouped
convs, shared prefixes, blob mode) and before the compiler exists.
"""

from __future__ import annotations

from math import prod

from mixc.compiler.plan import Accounting, Blob, Group, Plan, Slot, Tensor


def _conv_len(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _pair(v, dim: int) -> list[int]:
    return list(v) if isinstance(v, (list, tuple)) else [v] * dim


class PlanBuilder:
    """Declare ops in execution order, then ``finish`` with banks/blob."""

    def __init__(
        self, name: str, input_shape: list[int], members: int, layout: str = "image"
    ) -> None:
        self.name = name
        self.members = members
        self.input_shape = list(input_shape)
        self.layout = layout
        self.ops: list[dict] = []
        self.shape: dict[str, list[int]] = {}

    def _add(self, kind: str, name: str, inputs: list[str], out_shape: list[int], **fields) -> str:
        in_shape = self.shape[inputs[0]] if inputs else list(self.input_shape)
        self.ops.append(
            dict(
                kind=kind,
                name=name,
                inputs=inputs,
                in_shape=in_shape,
                out_shape=out_shape,
                **fields,
            )
        )
        self.shape[name] = out_shape
        return name

    def input(self, name: str = "input") -> str:
        return self._add("input", name, [], list(self.input_shape), layout=self.layout)

    def conv(
        self,
        name,
        x,
        out,
        kernel=3,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=False,
        source="plain",
    ):
        c, *spatial = self.shape[x]
        dim = len(spatial)
        k, s, p, d = (_pair(v, dim) for v in (kernel, stride, padding, dilation))
        out_sp = [_conv_len(n, *args) for n, args in zip(spatial, zip(k, s, p, d))]
        return self._add(
            "conv",
            name,
            [x],
            [out, *out_sp],
            dim=dim,
            in_channels=c,
            out_channels=out,
            kernel=k,
            stride=s,
            padding=p,
            dilation=d,
            groups=groups,
            bias=bias,
            source=source,
        )

    def linear(self, name, x, out, bias=True, source="plain"):
        (d,) = self.shape[x]
        return self._add(
            "linear", name, [x], [out], in_features=d, out_features=out, bias=bias, source=source
        )

    def bn(self, name, x, eps=1e-5, momentum=0.1):
        return self._add(
            "bn", name, [x], self.shape[x], channels=self.shape[x][0], eps=eps, momentum=momentum
        )

    def act(self, name, x, fn="relu", slope=0.01):
        return self._add("act", name, [x], self.shape[x], fn=fn, slope=slope)

    def pool(self, name, x, op="max", kernel=2, stride=None, padding=0):
        c, *spatial = self.shape[x]
        dim = len(spatial)
        k, s, p = _pair(kernel, dim), _pair(stride or kernel, dim), _pair(padding, dim)
        out_sp = [_conv_len(n, kk, ss, pp, 1) for n, kk, ss, pp in zip(spatial, k, s, p)]
        return self._add(
            "pool", name, [x], [c, *out_sp], op=op, dim=dim, kernel=k, stride=s, padding=p
        )

    def global_pool(self, name, x, op="avg"):
        return self._add("global_pool", name, [x], [self.shape[x][0]], op=op)

    def flatten(self, name, x):
        return self._add("flatten", name, [x], [prod(self.shape[x])])

    def dropout(self, name, x, p=0.5):
        return self._add("dropout", name, [x], self.shape[x], p=p)

    def add(self, name, a, b):
        assert self.shape[a] == self.shape[b], (self.shape[a], self.shape[b])
        return self._add("add", name, [a, b], self.shape[a])

    # -- weights ---------------------------------------------------------------

    def _weight_shape(self, op: dict) -> list[int]:
        if op["kind"] == "conv":
            return [op["out_channels"], op["in_channels"] // op["groups"], *op["kernel"]]
        return [op["out_features"], op["in_features"]]

    def _size(self, op: dict) -> int:
        out = op.get("out_channels", op.get("out_features"))
        return prod(self._weight_shape(op)) + (out if op["bias"] else 0)

    def finish(
        self,
        output: str,
        banks: (
            dict[str, tuple[list[str], int, int]] | None
        ) = None,  # group -> (layers, templates, k)
        blob: tuple[list[str], int, int] | None = None,  # (layers, size, k)
        assign: str = "shared",
        grouping: str = "by_shape",
    ) -> Plan:
        banks = banks or {}
        self._mark_sources(banks, blob)
        slots, tensors = [], []
        groups = self._bank_groups(banks, assign, slots, tensors)
        blob_model = self._blob(blob, assign, slots, tensors) if blob else None
        plain_layers, backbone = [], 0
        for o in self.ops:
            if o["kind"] in ("conv", "linear"):
                backbone += self._size(o)
                if o["source"] == "plain":
                    plain_layers.append(o["name"])
                tensors.extend(self._weight_tensors(o, slots))
            elif o["kind"] == "bn":
                backbone += 2 * o["channels"]
                tensors.extend(self._bn_tensors(o))
        plan = Plan(
            name=self.name,
            source=f"<hand-built {self.name}>",
            members=self.members,
            grouping=grouping,
            assign=assign,
            templates_per_layer=max([s.k for s in slots], default=1),
            bank_singletons=False,
            input_shape=self.input_shape,
            input_layout=self.layout,
            output=output,
            classes=self.shape[output][0],
            ops=self.ops,
            groups=groups,
            blob=blob_model,
            slots=slots,
            plain_layers=plain_layers,
            tensors=tensors,
            accounting=self._accounting(tensors, backbone),
        )
        return plan.model_copy(update={"spec_hash": plan.content_hash()})

    def _mark_sources(self, banks: dict, blob: tuple | None) -> None:
        """The layers the banks and the blob hold read their weights from there."""
        ops = {o["name"]: o for o in self.ops}
        for layers, *_ in banks.values():
            for name in layers:
                ops[name]["source"] = "bank"
        if blob:
            for name in blob[0]:
                ops[name]["source"] = "blob"

    def _bank_groups(self, banks: dict, assign: str, slots: list, tensors: list) -> list[Group]:
        """One Group per bank, its slots (templates dealt round-robin) and its bank tensor."""
        M = self.members
        ops = {o["name"]: o for o in self.ops}
        groups = []
        for g, (layers, n, k) in banks.items():
            first = ops[layers[0]]
            size = self._size(first)
            usage, counter = [0] * n, 0
            for name in layers:
                assert self._size(ops[name]) == size
                rows = []
                for m in range(M):
                    if assign == "greedy_disjoint" or m == 0:
                        row = [(counter + j) % n for j in range(k)]
                        counter += k
                    rows.append(list(row))
                    for t in row:
                        usage[t] += 1
                slots.append(Slot(layer=name, group=g, size=size, k=k, templates=rows))
            groups.append(
                Group(
                    name=g,
                    layers=layers,
                    weight_shape=self._weight_shape(first),
                    bias=first["bias"],
                    size=size,
                    share=0.0,
                    templates=n,
                    templates_per_layer=k,
                    requested_templates_per_layer=k,
                    usage=usage,
                )
            )
            tensors.append(Tensor(name=f"bank.{g}", shape=[n, size], role="bank", trainable=True))
        return groups

    def _blob(self, blob: tuple, assign: str, slots: list, tensors: list) -> Blob:
        """The blob, its slots (offsets dealt in turn) and its tensor."""
        M = self.members
        ops = {o["name"]: o for o in self.ops}
        layers, total, k = blob
        cover = [0] * total
        counter = 0
        for name in layers:
            size = self._size(ops[name])
            offsets = []
            for m in range(M):
                if assign == "greedy_disjoint" or m == 0:
                    off = counter % total
                    counter += k * size
                offsets.append(off)
                for j in range(k * size):
                    cover[(off + j) % total] += 1
            slots.append(Slot(layer=name, group="blob", size=size, k=k, offsets=offsets))
        tensors.append(Tensor(name="blob", shape=[total], role="blob", trainable=True))
        return Blob(size=total, layers=layers, usage_min=min(cover), usage_max=max(cover))

    def _weight_tensors(self, o: dict, slots: list[Slot]) -> list[Tensor]:
        """A conv or linear layer's tensors: plain or per-member weights, or its alphas."""
        M = self.members
        name, ws = o["name"], self._weight_shape(o)
        out = ws[0]
        if o["source"] in ("plain", "member"):
            src = o["source"]
            mine = {} if src == "plain" else {"per_member": True}
            lead = [] if src == "plain" else [M]
            tensors = [
                Tensor(
                    name=f"{src}.{name}.weight",
                    shape=[*lead, *ws],
                    role=f"{src}_weight",
                    trainable=True,
                    layer=name,
                    **mine,
                )
            ]
            if o["bias"]:
                tensors.append(
                    Tensor(
                        name=f"{src}.{name}.bias",
                        shape=[*lead, out],
                        role=f"{src}_bias",
                        trainable=True,
                        layer=name,
                        **mine,
                    )
                )
            return tensors
        k = next(s.k for s in slots if s.layer == name)
        return [
            Tensor(
                name=f"alpha.{name}",
                shape=[M, k],
                role="alpha",
                trainable=True,
                layer=name,
                per_member=True,
            )
        ]

    def _bn_tensors(self, o: dict) -> list[Tensor]:
        """A BatchNorm's per-member affine parameters and running statistics."""
        name, c = o["name"], o["channels"]
        return [
            Tensor(
                name=f"bn.{name}.{suffix}",
                shape=[self.members, c],
                role=role,
                trainable=trainable,
                layer=name,
                per_member=True,
            )
            for suffix, role, trainable in (
                ("weight", "bn_weight", True),
                ("bias", "bn_bias", True),
                ("running_mean", "bn_mean", False),
                ("running_var", "bn_var", False),
            )
        ]

    def _accounting(self, tensors: list[Tensor], backbone: int) -> Accounting:
        M = self.members

        def total_of(*roles):
            return sum(t.numel for t in tensors if t.role in roles and t.trainable)

        return Accounting(
            backbone_params=backbone,
            naive_params=M * backbone,
            plain_params=total_of("plain_weight", "plain_bias", "member_weight", "member_bias"),
            template_params=total_of("bank", "blob"),
            alpha_params=total_of("alpha"),
            bn_params=total_of("bn_weight", "bn_bias"),
            total_params=sum(t.numel for t in tensors if t.trainable),
            budget=None,
            minimum_budget=0,
            per_member_params=(total_of("alpha") + total_of("bn_weight", "bn_bias")) // M,
        )


# ---------------------------------------------------------------------------
# The plans the tests use


def tiny_convnet(
    members: int = 3, classes: int = 5, assign: str = "shared", name: str = "tiny"
) -> Plan:
    """Plain stem shared by all members, one bank group (two convs), per-member BN, plain head."""
    b = PlanBuilder(name, [3, 8, 8], members)
    x = b.input()
    h = b.conv("stem", x, 8, kernel=3, padding=1)
    h = b.act("stem_relu", h)  # still shared: members diverge at the first BN
    h = b.bn("bn0", h)
    r = b.conv("b0.conv1", h, 8, kernel=3, padding=1)
    r = b.bn("b0.bn1", r)
    r = b.act("b0.relu1", r)
    r = b.conv("b0.conv2", r, 8, kernel=3, padding=1)
    h = b.add("b0.add", h, r)
    h = b.act("relu", h)
    h = b.global_pool("pool", h)
    b.linear("fc", h, classes)
    return b.finish("fc", banks={"g0": (["b0.conv1", "b0.conv2"], 3, 2)}, assign=assign)


def rich_convnet(members: int = 3, assign: str = "greedy_disjoint", dropout: float = 0.3) -> Plan:
    """Every op kind and source on 2-D images: member stem on the shared input,
    grouped/strided/dilated convs, a biased bank, a shortcut add, pooling, dropout."""
    b = PlanBuilder("rich", [3, 12, 12], members)
    x = b.input()
    s = b.pool("in_pool", x, "avg", kernel=3, stride=1, padding=1)  # shared op on the input
    h = b.conv("stem", s, 8, kernel=3, padding=1, bias=True, source="member")
    h = b.bn("stem_bn", h, eps=1e-3, momentum=0.2)
    h = b.act("stem_act", h, "leaky_relu", slope=0.1)
    r = b.conv("b1.conv1", h, 8, kernel=3, padding=2, dilation=2, groups=2, bias=True)
    r = b.act("b1.gelu", r, "gelu")
    r = b.conv("b1.conv2", r, 8, kernel=3, padding=1, groups=2, bias=True)
    h = b.add("b1.add", h, r)
    h = b.conv("down", h, 12, kernel=3, stride=2, padding=1, bias=True)  # plain on per-member input
    h = b.bn("down_bn", h)
    h = b.act("down_act", h, "silu")
    r = b.conv("b2.conv1", h, 12, kernel=1, bias=True)
    r = b.act("b2.tanh", r, "tanh")
    r = b.conv("b2.conv2", r, 12, kernel=1, bias=True)
    h = b.add("b2.add", h, r)
    h = b.pool("pool", h, "max", kernel=2)
    h = b.act("sig", h, "sigmoid")
    h = b.flatten("flat", h)
    h = b.dropout("drop", h, dropout)
    h = b.linear("fc1", h, 16, source="member")
    h = b.act("fc1_relu", h)
    b.linear("fc2", h, 4)
    return b.finish(
        "fc2",
        banks={"g_dw": (["b1.conv1", "b1.conv2"], 5, 2), "g_pw": (["b2.conv1", "b2.conv2"], 7, 3)},
        assign=assign,
    )


def signal_blob_net(
    members: int = 2, assign: str = "greedy_disjoint", blob_size: int = 700
) -> Plan:
    """1-D convs and linears reading one wrapped flat blob; bank conv on the shared input."""
    b = PlanBuilder("signal", [2, 16], members, layout="signal")
    x = b.input()
    h = b.conv("c1", x, 6, kernel=3, padding=1, groups=2)  # blob, groups > 1 on the shared input
    h = b.bn("bn1", h)
    h = b.act("a1", h)
    h = b.pool("p1", h, "avg", kernel=2)
    h = b.conv("c2", h, 6, kernel=3, padding=1, bias=True)
    h = b.act("a2", h)
    h = b.global_pool("gp", h, "max")
    h = b.linear("fc1", h, 6)
    h = b.act("a3", h)
    b.linear("fc2", h, 3)
    return b.finish(
        "fc2", blob=(["c1", "c2", "fc1", "fc2"], blob_size, 2), assign=assign, grouping="single"
    )


def mlp_net(members: int = 4, dropout: float = 0.1) -> Plan:
    """Vectors only: a banked first layer on the shared input, dropout, a banked head with bias."""
    b = PlanBuilder("mlp", [10], members, layout="vector")
    x = b.input()
    h = b.linear("l1", x, 12)
    h = b.act("a1", h)
    h = b.linear("l2", h, 12)
    h = b.act("a2", h)
    h = b.dropout("d", h, dropout)
    h = b.linear("l3", h, 12)
    h = b.add("res", h, b.linear("skip", x, 12, source="member"))
    h = b.add("res2", h, b.linear("pskip", x, 12))  # shared + per-member
    b.linear("out", h, 3, bias=True)
    return b.finish(
        "out", banks={"g12": (["l2", "l3"], 3, 3), "g_in": (["l1"], 2, 2)}, assign="shared"
    )


def three_conv_bank() -> Plan:
    """Three 32-wide 3x3 convs sharing one bank of 6 templates (k = 4, shared): for init checks."""
    b = PlanBuilder("wide", [32, 8, 8], 3)
    x = b.input()
    h = b.conv("c1", x, 32, kernel=3, padding=1)
    h = b.conv("c2", h, 32, kernel=3, padding=1)
    h = b.conv("c3", h, 32, kernel=3, padding=1)
    h = b.global_pool("gp", h)
    b.linear("fc", h, 4)
    return b.finish("fc", banks={"g": (["c1", "c2", "c3"], 6, 4)}, assign="shared")
