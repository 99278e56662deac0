"""The `calculator` tool: exact arithmetic a language model can trust.

    calculate("48213*9127")        -> "440040051"
    calculate("1/3 + 1/6")         -> "0.5"
    calculate("1/3")               -> "1/3 ≈ 0.333333333333333333333333333333"
    calculate("sqrt(2)")           -> "1.41421356237309504880168872421"
    calculate("2^10 + 5!")         -> "1144"

Parsed with `ast` (never `eval`): only numbers, + - * / // % ** (and ^ as power), unary signs,
parentheses, the constants pi, e, tau and the functions in FUNCTIONS. Numbers are exact
fractions (decimal literals included: 0.1 + 0.2 is exactly 0.3) until a function that is
irrational in general (sqrt of a non-square, sin, log...) makes them 60-digit decimals.
Work is bounded: results over MAX_DIGITS digits, huge exponents and factorials are refused before
they are computed, so `9**9**9**9` answers at once with an error.

Output is deterministic: integers in full; other exact results as a decimal when short and
terminating, else "p/q ≈ decimal"; inexact results to 30 significant digits.
"""
from __future__ import annotations

import ast
import decimal
import math
import re
from decimal import Decimal
from fractions import Fraction

MAX_EXPRESSION_CHARS = 1000
MAX_DIGITS = 4000  # of any intermediate result (Python refuses int->str past 4300 digits anyway)
MAX_FACTORIAL = 1000
MAX_ROOT_DEGREE = 1000
PREC = 60  # working digits for inexact values
SHOWN = 30  # significant digits shown for inexact values
_LOG10_2 = math.log10(2)

Number = Fraction | Decimal


class CalculatorError(ValueError):
    """A clear message for the model: what is wrong with the expression."""


def _ctx() -> decimal.Context:
    return decimal.Context(prec=PREC, Emax=10**6, Emin=-(10**6), traps=[decimal.Overflow, decimal.InvalidOperation, decimal.DivisionByZero])


def _digits(n: int) -> int:
    return int(abs(n).bit_length() * _LOG10_2) + 1


def _check_size(x: Number) -> Number:
    if isinstance(x, Fraction):
        if _digits(x.numerator) > MAX_DIGITS or _digits(x.denominator) > MAX_DIGITS:
            raise CalculatorError(f"result too large (more than {MAX_DIGITS} digits)")
    return x


def _dec(x: Number) -> Decimal:
    if isinstance(x, Decimal):
        return x
    ctx = _ctx()
    return ctx.divide(Decimal(x.numerator), Decimal(x.denominator))


def _is_int(x: Number) -> bool:
    return isinstance(x, Fraction) and x.denominator == 1


def _to_int(x: Number, what: str) -> int:
    if _is_int(x):
        return x.numerator
    if isinstance(x, Decimal) and x == x.to_integral_value():
        return int(x)
    raise CalculatorError(f"{what} needs an integer, got {format_number(x)}")


# ---------------------------------------------------------------- constants and series

_PI_CACHE: dict[int, Decimal] = {}


def _pi() -> Decimal:
    if PREC not in _PI_CACHE:
        # Machin: pi/4 = 4 atan(1/5) - atan(1/239), with 10 guard digits.
        with decimal.localcontext(_ctx()) as ctx:
            ctx.prec = PREC + 10

            def atan_inv(n: int) -> Decimal:
                x = Decimal(1) / n
                x2, term, total, k = x * x, x, x, 1
                while True:
                    term = -term * x2
                    k += 2
                    t = term / k
                    if t == 0 or abs(t) < Decimal(10) ** -(PREC + 10):
                        return total
                    total += t

            pi = 4 * (4 * atan_inv(5) - atan_inv(239))
        _PI_CACHE[PREC] = _ctx().plus(pi)
    return _PI_CACHE[PREC]


def _sin_cos(x: Decimal) -> tuple[Decimal, Decimal]:
    if abs(x) > Decimal(10) ** 40:
        raise CalculatorError("argument of a trigonometric function is too large to be meaningful")
    with decimal.localcontext(_ctx()) as ctx:
        ctx.prec = PREC + 10
        two_pi = 2 * _pi()
        x = x - two_pi * (x / two_pi).to_integral_value(rounding=decimal.ROUND_FLOOR)
        s, c = Decimal(0), Decimal(0)
        term, k = Decimal(1), 0  # x^k / k!
        eps = Decimal(10) ** -(PREC + 8)
        while True:
            if k % 4 == 0:
                c += term
            elif k % 4 == 1:
                s += term
            elif k % 4 == 2:
                c -= term
            else:
                s -= term
            k += 1
            term = term * x / k
            if abs(term) < eps and k > 2:
                break
        return s, c


def _snap_zero(v: Decimal, arg: Decimal) -> Decimal:
    # sin(pi) is 0, not 1e-61: a result far below the working precision of the argument is noise.
    if abs(v) < Decimal(10) ** -(PREC - 10) * max(Decimal(1), abs(arg)) and abs(arg) > Decimal(10) ** -(PREC // 2):
        return Decimal(0)
    return v


# ---------------------------------------------------------------- functions


def _sqrt(x: Number) -> Number:
    return _root(x, Fraction(2))


def _cbrt(x: Number) -> Number:
    return _root(x, Fraction(3))


def _exact_root(n: int, k: int) -> int | None:
    if n < 0:
        return None
    r = int(round(n ** (1.0 / k))) if _digits(n) < 300 else int(Decimal(n) ** (Decimal(1) / k))
    for c in (r - 1, r, r + 1):
        if c >= 0 and c**k == n:
            return c
    if k == 2:
        s = math.isqrt(n)
        return s if s * s == n else None
    return None


def _root(x: Number, n: Number) -> Number:
    k = _to_int(n, "root degree")
    if k < 1 or k > MAX_ROOT_DEGREE:
        raise CalculatorError(f"root degree must be between 1 and {MAX_ROOT_DEGREE}, got {k}")
    negative = x < 0
    if negative and k % 2 == 0:
        name = "sqrt" if k == 2 else f"root of degree {k}"
        raise CalculatorError(f"{name} of a negative number ({format_number(x)}) is not a real number")
    if isinstance(x, Fraction):
        a = abs(x)
        num, den = _exact_root(a.numerator, k), _exact_root(a.denominator, k)
        if num is not None and den is not None:
            r = Fraction(num, den)
            return -r if negative else r
    d = abs(_dec(x))
    if d == 0:
        return Fraction(0)
    ctx = _ctx()
    r = ctx.sqrt(d) if k == 2 else ctx.power(d, ctx.divide(Decimal(1), Decimal(k)))
    return -r if negative else r


def _ln(x: Number) -> Number:
    if x <= 0:
        raise CalculatorError(f"log of zero or a negative number ({format_number(x)}) is undefined")
    if x == 1:
        return Fraction(0)
    return _ctx().ln(_dec(x))


def _log(x: Number, base: Number | None = None) -> Number:
    if base is None:
        return _ln(x)
    if base <= 0 or base == 1:
        raise CalculatorError(f"log base must be positive and not 1, got {format_number(base)}")
    value = _ctx().divide(_dec(_ln(x)) if x != 1 else Decimal(0), _dec(_ln(base)))
    # log(8, 2) is exactly 3: check the nearest integer on exact inputs.
    if isinstance(x, Fraction) and isinstance(base, Fraction):
        k = int(value.to_integral_value())
        if abs(k) <= 10000 and _digits(base.numerator) * abs(k) <= MAX_DIGITS * 2 and base**k == x:
            return Fraction(k)
    return value


def _log10(x: Number) -> Number:
    return _log(x, Fraction(10))


def _log2(x: Number) -> Number:
    return _log(x, Fraction(2))


def _exp(x: Number) -> Number:
    if x == 0:
        return Fraction(1)
    try:
        return _ctx().exp(_dec(x))
    except decimal.Overflow:
        raise CalculatorError("result too large") from None


def _sin(x: Number) -> Number:
    if x == 0:
        return Fraction(0)
    d = _dec(x)
    return _ctx().plus(_snap_zero(_sin_cos(d)[0], d))


def _cos(x: Number) -> Number:
    if x == 0:
        return Fraction(1)
    d = _dec(x)
    return _ctx().plus(_snap_zero(_sin_cos(d)[1], d))


def _tan(x: Number) -> Number:
    if x == 0:
        return Fraction(0)
    d = _dec(x)
    s, c = _sin_cos(d)
    s, c = _snap_zero(s, d), _snap_zero(c, d)
    if c == 0:
        raise CalculatorError("tan is undefined at odd multiples of pi/2")
    return _ctx().divide(s, c)


def _asin(x: Number) -> Number:
    if abs(x) > 1:
        raise CalculatorError(f"asin needs a value between -1 and 1, got {format_number(x)}")
    return _atan2(_dec(x), _ctx().sqrt(1 - _dec(x) ** 2))


def _acos(x: Number) -> Number:
    if abs(x) > 1:
        raise CalculatorError(f"acos needs a value between -1 and 1, got {format_number(x)}")
    return _atan2(_ctx().sqrt(1 - _dec(x) ** 2), _dec(x))


def _atan(x: Number) -> Number:
    return _atan2(_dec(x), Decimal(1))


def _atan2(y: Decimal, x: Decimal) -> Number:
    """atan2 by Newton's method on tan, seeded from floats (60 digits in a few steps)."""
    if x == 0 and y == 0:
        return Fraction(0)
    with decimal.localcontext(_ctx()) as ctx:
        ctx.prec = PREC + 10
        theta = Decimal(repr(math.atan2(float(y), float(x))))
        for _ in range(8):
            # rotate (x, y) by -theta; the angle left is small and atan(v/u) ~ v/u squares the error
            s, c = _sin_cos(theta)
            u, v = x * c + y * s, y * c - x * s
            delta = v / u if u != 0 else Decimal(0)
            theta += delta
            if abs(delta) < Decimal(10) ** -(PREC + 5):
                break
    return _ctx().plus(theta)


def _factorial(x: Number) -> Number:
    n = _to_int(x, "factorial")
    if n < 0:
        raise CalculatorError(f"factorial needs a non-negative integer, got {n}")
    if n > MAX_FACTORIAL:
        raise CalculatorError(f"factorial argument too large (limit {MAX_FACTORIAL}), got {n}")
    return Fraction(math.factorial(n))


def _gcd(*xs: Number) -> Number:
    if not xs:
        raise CalculatorError("gcd needs at least one integer")
    return Fraction(math.gcd(*[_to_int(x, "gcd") for x in xs]))


def _lcm(*xs: Number) -> Number:
    if not xs:
        raise CalculatorError("lcm needs at least one integer")
    return _check_size(Fraction(math.lcm(*[_to_int(x, "lcm") for x in xs])))


def _floor(x: Number) -> Number:
    return Fraction(math.floor(x)) if isinstance(x, Fraction) else Fraction(int(x.to_integral_value(rounding=decimal.ROUND_FLOOR)))


def _ceil(x: Number) -> Number:
    return Fraction(math.ceil(x)) if isinstance(x, Fraction) else Fraction(int(x.to_integral_value(rounding=decimal.ROUND_CEILING)))


def _round(x: Number, ndigits: Number | None = None) -> Number:
    nd = 0 if ndigits is None else _to_int(ndigits, "round")
    if abs(nd) > 100:
        raise CalculatorError("round: digits must be between -100 and 100")
    q = Decimal(1).scaleb(-nd)
    d = _dec(x) if isinstance(x, Decimal) else None
    if d is None:
        # exact half-up rounding of a fraction (what people expect of a calculator)
        scaled = x * Fraction(10) ** nd
        r = math.floor(scaled + Fraction(1, 2)) if scaled >= 0 else -math.floor(-scaled + Fraction(1, 2))
        return Fraction(r) / Fraction(10) ** nd
    return Fraction(d.quantize(q, rounding=decimal.ROUND_HALF_UP, context=_ctx()))


def _abs(x: Number) -> Number:
    return abs(x)


FUNCTIONS = {
    "sqrt": (_sqrt, 1, 1), "cbrt": (_cbrt, 1, 1), "root": (_root, 2, 2),
    "sin": (_sin, 1, 1), "cos": (_cos, 1, 1), "tan": (_tan, 1, 1),
    "asin": (_asin, 1, 1), "acos": (_acos, 1, 1), "atan": (_atan, 1, 1),
    "log": (_log, 1, 2), "ln": (_ln, 1, 1), "log10": (_log10, 1, 1), "log2": (_log2, 1, 1),
    "exp": (_exp, 1, 1), "abs": (_abs, 1, 1), "floor": (_floor, 1, 1), "ceil": (_ceil, 1, 1),
    "round": (_round, 1, 2), "factorial": (_factorial, 1, 1),
    "gcd": (_gcd, 1, 64), "lcm": (_lcm, 1, 64),
}
CONSTANTS = {"pi": lambda: _pi(), "e": lambda: _ctx().exp(Decimal(1)), "tau": lambda: 2 * _pi()}


# ---------------------------------------------------------------- arithmetic


def _pow(a: Number, b: Number) -> Number:
    if isinstance(b, Fraction) and b.denominator == 1:
        k = b.numerator
        if a == 0 and k < 0:
            raise CalculatorError("division by zero (0 to a negative power)")
        if isinstance(a, Fraction):
            if a in (0, 1, -1):
                return a**k
            # Digits of the result, estimated before computing it: numerator or denominator is at
            # least 2, so each unit of |k| adds at least log10(2) digits.
            if abs(k) > MAX_DIGITS * 4:
                raise CalculatorError(f"result too large (exponent {format_number(b) if _digits(k) < 30 else 'with ' + str(_digits(k)) + ' digits'}, limit {MAX_DIGITS} digits)")
            size = int(max(math.log10(abs(a.numerator)), math.log10(a.denominator)) * abs(k))
            if size > MAX_DIGITS + 10:
                raise CalculatorError(f"result too large (about {size} digits, limit {MAX_DIGITS})")
            return _check_size(a**k)
        try:
            return _ctx().power(a, k)
        except decimal.Overflow:
            raise CalculatorError("result too large") from None
    # fractional exponent p/q: an exact root when there is one (8**(2/3) = 4), else decimals.
    if isinstance(b, Fraction) and isinstance(a, Fraction) and b.denominator <= MAX_ROOT_DEGREE:
        if a < 0 and b.denominator % 2 == 0:
            raise CalculatorError(f"a negative number ({format_number(a)}) to a fractional power is not real")
        r = _root(a, Fraction(b.denominator))
        return _pow(r, Fraction(b.numerator))
    if a < 0:
        raise CalculatorError(f"a negative number ({format_number(a)}) to a fractional power is not real")
    if a == 0:
        if b < 0:
            raise CalculatorError("division by zero (0 to a negative power)")
        return Fraction(0)
    try:
        return _ctx().power(_dec(a), _dec(b))
    except decimal.Overflow:
        raise CalculatorError("result too large") from None


def _binop(op: ast.operator, a: Number, b: Number) -> Number:
    if isinstance(op, ast.Pow):
        return _pow(a, b)
    exact = isinstance(a, Fraction) and isinstance(b, Fraction)
    if isinstance(op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
        raise CalculatorError("division by zero")
    if not exact:
        a, b = _dec(a), _dec(b)
        ctx = _ctx()
        try:
            if isinstance(op, ast.Add):
                return ctx.add(a, b)
            if isinstance(op, ast.Sub):
                return ctx.subtract(a, b)
            if isinstance(op, ast.Mult):
                return ctx.multiply(a, b)
            if isinstance(op, ast.Div):
                return ctx.divide(a, b)
            if isinstance(op, ast.FloorDiv):
                return Fraction(int(ctx.divide(a, b).to_integral_value(rounding=decimal.ROUND_FLOOR)))
            if isinstance(op, ast.Mod):
                return ctx.subtract(a, ctx.multiply(b, ctx.divide(a, b).to_integral_value(rounding=decimal.ROUND_FLOOR)))
        except decimal.Overflow:
            raise CalculatorError("result too large") from None
    else:
        if isinstance(op, ast.Add):
            return _check_size(a + b)
        if isinstance(op, ast.Sub):
            return _check_size(a - b)
        if isinstance(op, ast.Mult):
            return _check_size(a * b)
        if isinstance(op, ast.Div):
            return _check_size(a / b)
        if isinstance(op, ast.FloorDiv):
            return Fraction(a // b)
        if isinstance(op, ast.Mod):
            return a % b
    raise CalculatorError(f"operator {_OP_NAMES.get(type(op), type(op).__name__)} is not supported")


_OP_NAMES = {ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>", ast.MatMult: "@"}
_NUMBER_RE = re.compile(r"^(\d[\d_]*)?(\.[\d_]*)?([eE][+-]?\d+)?$")


def _literal(node: ast.Constant, source: str) -> Number:
    v = node.value
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise CalculatorError(f"only numbers are allowed, got {v!r}")
    if isinstance(v, int):
        return Fraction(v)
    text = (ast.get_source_segment(source, node) or repr(v)).replace("_", "")
    m = _NUMBER_RE.match(text)
    if not m:
        return Fraction(v)
    if m.group(3) and abs(int(m.group(3)[1:])) > MAX_DIGITS:
        raise CalculatorError(f"number {text} is out of range (exponent limit {MAX_DIGITS})")
    return Fraction(text)  # the decimal as written: 0.1 is exactly 1/10, not the nearest float


def _eval(node: ast.AST, source: str) -> Number:
    if isinstance(node, ast.Expression):
        return _eval(node.body, source)
    if isinstance(node, ast.Constant):
        return _literal(node, source)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand, source)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        return _binop(node.op, _eval(node.left, source), _eval(node.right, source))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]()
        if node.id in FUNCTIONS:
            raise CalculatorError(f"{node.id} is a function: write {node.id}(x)")
        raise CalculatorError(f"unknown name '{node.id}' (constants: {', '.join(CONSTANTS)})")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise CalculatorError(f"unknown function '{name}' (known: {', '.join(FUNCTIONS)})")
        if node.keywords:
            raise CalculatorError(f"{node.func.id}() takes positional arguments only")
        fn, lo, hi = FUNCTIONS[node.func.id]
        if not lo <= len(node.args) <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise CalculatorError(f"{node.func.id}() takes {want} argument(s), got {len(node.args)}")
        args = [_eval(a, source) for a in node.args]
        try:
            return fn(*args)
        except (decimal.Overflow, OverflowError):
            raise CalculatorError(f"{node.func.id}(): result too large") from None
        except (decimal.InvalidOperation, ValueError) as e:
            if isinstance(e, CalculatorError):
                raise
            raise CalculatorError(f"{node.func.id}(): invalid argument") from None
    if isinstance(node, (ast.Compare, ast.BoolOp)):
        raise CalculatorError("comparisons and logic are not supported: give one arithmetic expression")
    if isinstance(node, ast.Tuple):
        raise CalculatorError("give one expression (no commas; write 48213 rather than 48,213)")
    raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


_REPLACE = {"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-", "^": "**", "π": "pi", "√": "sqrt"}


def _prepare(expression: str) -> str:
    text = expression.strip()
    for a, b in _REPLACE.items():
        text = text.replace(a, b)
    text = re.sub(r"(\d+(?:\.\d*)?|\))\s*!(?!=)", lambda m: f"factorial({m.group(1)})" if m.group(1) != ")" else ")!", text)
    if "!" in text:
        raise CalculatorError("write factorial(n) for factorials of expressions")
    text = re.sub(r"sqrt(\d+(?:\.\d*)?)", r"sqrt(\1)", text)  # "√2" -> sqrt2 -> sqrt(2)
    return text


def evaluate(expression: str) -> Number:
    """The value of `expression` as an exact Fraction or a 60-digit Decimal; CalculatorError if invalid."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("empty expression")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression too long ({len(expression)} characters, limit {MAX_EXPRESSION_CHARS})")
    text = _prepare(expression)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"cannot parse '{expression}': {e.msg}") from None
    except (ValueError, MemoryError, RecursionError):
        raise CalculatorError("cannot parse the expression") from None
    try:
        with decimal.localcontext(_ctx()):  # every Decimal operation at PREC digits, with traps
            return _eval(tree, text)
    except RecursionError:
        raise CalculatorError("expression too deeply nested") from None
    except OverflowError:
        raise CalculatorError("result too large") from None
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except decimal.DivisionByZero:
        raise CalculatorError("division by zero") from None
    except decimal.Overflow:
        raise CalculatorError("result too large") from None
    except decimal.InvalidOperation:
        raise CalculatorError("invalid operation") from None


def _fmt_decimal(d: Decimal, digits: int = SHOWN) -> str:
    if d == 0:
        return "0"
    ctx = decimal.Context(prec=digits, rounding=decimal.ROUND_HALF_EVEN, Emax=10**7, Emin=-(10**7))
    d = ctx.plus(d).normalize(ctx)
    exp = d.adjusted()
    if -7 <= exp < digits:
        s = format(d, "f")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        return s
    mant = format(d.scaleb(-exp, ctx), "f")
    if "." in mant:
        mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{exp:+d}"


def format_number(x: Number) -> str:
    """Deterministic text of a value (see the module docstring)."""
    if isinstance(x, Decimal):
        return _fmt_decimal(x)
    if x.denominator == 1:
        return str(x.numerator)
    # a short terminating decimal (denominator 2^a 5^b) is written as one
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    approx = _fmt_decimal(_dec(x))
    if d == 1:
        exact = _ctx().divide(Decimal(x.numerator), Decimal(x.denominator))
        if len(exact.normalize(_ctx()).as_tuple().digits) <= SHOWN:
            return approx
    if _digits(x.numerator) + _digits(x.denominator) <= 40:
        return f"{x.numerator}/{x.denominator} ≈ {approx}"
    return approx


def calculate(expression: str) -> str:
    """Evaluate and format; raises CalculatorError with a clear message for bad input."""
    value = evaluate(expression)
    if isinstance(value, Fraction):
        _check_size(value)
    return format_number(value)


def calculator_tool(expression: str) -> str:
    """The `calculator` tool's function: the result text (errors raise CalculatorError)."""
    return calculate(expression)


SCHEMA = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": (
            "Exact arithmetic on big integers, fractions and decimals. Operators + - * / // % ** "
            "(^ also means power), n! ; functions sqrt, cbrt, root(x, n), sin, cos, tan, asin, acos, "
            "atan, exp, ln, log(x) (natural), log(x, base), log10, log2, abs, floor, ceil, round(x, n), "
            "factorial, gcd, lcm; constants pi, e, tau."
        ),
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "an arithmetic expression, e.g. 48213*9127"}},
            "required": ["expression"],
        },
    },
}
