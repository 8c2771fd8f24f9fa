//! Ordering an undefined value fails, as in Prefect.
//!
//! Prefect renders with Jinja's `ChainableUndefined`, whose `<`, `<=`, `>` and `>=` raise
//! `UndefinedError` (so the action fails and no run starts), while `==`, `!=`, `in`, printing
//! and truthiness work. minijinja orders an undefined value below everything and has no hook
//! on its comparison operators. So before a template is compiled, each operand of an ordering
//! comparison (and the value tested by `gt`, `ge`, `lt`, `le`, `greaterthan`, `lessthan`) is
//! wrapped in a filter that fails on an undefined value and passes any other value through
//! unchanged: `a > 4` is compiled as `(a)|__spur_ordered('>') > (4)|__spur_ordered('>')`.
//!
//! Operands are found with minijinja's parser (its `unstable_machinery` API, pinned by the
//! lock file): the text between an operand's first and last token is wrapped, so the rewrite
//! cannot change what the template means for defined values (a filter on a parenthesised
//! expression binds tighter than any operator).

use std::borrow::Cow;

use minijinja::machinery::{ast, parse};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::Value;
use minijinja::{Error, ErrorKind};

/// The filter the rewrite inserts. Its name cannot be written by users' templates by accident
/// (`spur check` would name it as Spur-only anyway).
pub(crate) const FILTER: &str = "__spur_ordered";

/// The filter: `value` unchanged, or an error if it is undefined.
pub(crate) fn ordered(value: Value, op: &str) -> Result<Value, Error> {
    if value.is_undefined() {
        return Err(Error::new(
            ErrorKind::UndefinedError,
            format!("an undefined value compared with `{op}` (Prefect fails here too)"),
        ));
    }
    Ok(value)
}

/// `source` with every ordering operand guarded, or `source` itself when it has none (or
/// does not parse: compiling it reports the error).
pub(crate) fn guard(source: &str) -> Cow<'_, str> {
    if !source.contains(['<', '>']) && !source.contains(" is ") {
        return Cow::Borrowed(source);
    }
    let Ok(tree) = parse(source, "<template>", SyntaxConfig::default()) else {
        return Cow::Borrowed(source);
    };
    let mut edits = Edits::default();
    edits.stmt(&tree);
    if edits.0.is_empty() {
        return Cow::Borrowed(source);
    }
    // Insert from the end so that earlier offsets stay valid. At one offset, a closing
    // `)|filter` ends up before an opening `(` (they belong to adjacent operands), and of two
    // closings the inner operand's (deeper) first; openings are all the same text. What is
    // inserted at an offset lands before what was inserted there earlier, so at one offset
    // the insertions go openings, then closings outer to inner.
    edits.0.sort_by(|a, b| {
        b.offset
            .cmp(&a.offset)
            .then((a.close, a.depth).cmp(&(b.close, b.depth)))
    });
    let mut out = source.to_owned();
    for edit in edits.0.iter() {
        let Some(at) = usize::try_from(edit.offset)
            .ok()
            .filter(|&at| out.is_char_boundary(at))
        else {
            return Cow::Borrowed(source);
        };
        if edit.close {
            out.insert_str(at, &format!(")|{FILTER}('{}')", edit.op));
        } else {
            out.insert(at, '(');
        }
    }
    Cow::Owned(out)
}

/// Jinja's ordering tests and the operator each applies.
const ORDERING_TESTS: [(&str, &str); 6] = [
    ("gt", ">"),
    ("ge", ">="),
    ("lt", "<"),
    ("le", "<="),
    ("greaterthan", ">"),
    ("lessthan", "<"),
];

struct Edit {
    offset: u32,
    close: bool,
    depth: usize,
    op: &'static str,
}

/// The insertions to make, and how many guarded operands enclose the walk's position.
#[derive(Default)]
struct Edits(Vec<Edit>, usize);

impl Edits {
    fn guard(&mut self, expr: &ast::Expr<'_>, op: &'static str) {
        let (start, end) = extent(expr);
        let depth = self.1;
        self.0.push(Edit {
            offset: start,
            close: false,
            depth,
            op,
        });
        self.0.push(Edit {
            offset: end,
            close: true,
            depth,
            op,
        });
        self.1 += 1;
        self.expr(expr);
        self.1 -= 1;
    }

    fn stmts(&mut self, body: &[ast::Stmt<'_>]) {
        for stmt in body {
            self.stmt(stmt);
        }
    }

    fn stmt(&mut self, stmt: &ast::Stmt<'_>) {
        use ast::Stmt;
        match stmt {
            Stmt::Template(s) => self.stmts(&s.children),
            Stmt::EmitExpr(s) => self.expr(&s.expr),
            Stmt::EmitRaw(_) | Stmt::Continue(_) | Stmt::Break(_) => {}
            Stmt::ForLoop(s) => {
                self.expr(&s.iter);
                if let Some(f) = &s.filter_expr {
                    self.expr(f);
                }
                self.stmts(&s.body);
                self.stmts(&s.else_body);
            }
            Stmt::IfCond(s) => {
                self.expr(&s.expr);
                self.stmts(&s.true_body);
                self.stmts(&s.false_body);
            }
            Stmt::WithBlock(s) => {
                for (_, value) in &s.assignments {
                    self.expr(value);
                }
                self.stmts(&s.body);
            }
            Stmt::Set(s) => self.expr(&s.expr),
            Stmt::SetBlock(s) => {
                if let Some(f) = &s.filter {
                    self.expr(f);
                }
                self.stmts(&s.body);
            }
            Stmt::AutoEscape(s) => {
                self.expr(&s.enabled);
                self.stmts(&s.body);
            }
            Stmt::FilterBlock(s) => {
                self.expr(&s.filter);
                self.stmts(&s.body);
            }
            Stmt::Block(s) => self.stmts(&s.body),
            Stmt::Import(s) => self.expr(&s.expr),
            Stmt::FromImport(s) => self.expr(&s.expr),
            Stmt::Extends(s) => self.expr(&s.name),
            Stmt::Include(s) => self.expr(&s.name),
            Stmt::Macro(s) => {
                for d in &s.defaults {
                    self.expr(d);
                }
                self.stmts(&s.body);
            }
            Stmt::CallBlock(s) => {
                self.call(&s.call);
                for d in &s.macro_decl.defaults {
                    self.expr(d);
                }
                self.stmts(&s.macro_decl.body);
            }
            Stmt::Do(s) => self.call(&s.call),
        }
    }

    fn call(&mut self, call: &ast::Call<'_>) {
        self.expr(&call.expr);
        self.args(&call.args);
    }

    fn args(&mut self, args: &[ast::CallArg<'_>]) {
        for arg in args {
            self.expr(arg_expr(arg));
        }
    }

    fn expr(&mut self, expr: &ast::Expr<'_>) {
        use ast::{BinOpKind, CompareOpKind, Expr};
        match expr {
            Expr::BinOp(b) => {
                let op = match b.op {
                    BinOpKind::Lt => Some("<"),
                    BinOpKind::Lte => Some("<="),
                    BinOpKind::Gt => Some(">"),
                    BinOpKind::Gte => Some(">="),
                    _ => None,
                };
                match op {
                    Some(op) => {
                        self.guard(&b.left, op);
                        self.guard(&b.right, op);
                    }
                    None => {
                        self.expr(&b.left);
                        self.expr(&b.right);
                    }
                }
            }
            Expr::Compare(c) => {
                // `a < b < c` is `a < b and b < c`: an operand is guarded if an ordering
                // operator stands on either side of it.
                let ordering = |op: &CompareOpKind| match op {
                    CompareOpKind::Lt => Some("<"),
                    CompareOpKind::Lte => Some("<="),
                    CompareOpKind::Gt => Some(">"),
                    CompareOpKind::Gte => Some(">="),
                    _ => None,
                };
                let mut operands = vec![&c.expr];
                operands.extend(c.ops.iter().map(|o| &o.expr));
                for (i, operand) in operands.into_iter().enumerate() {
                    let before = i.checked_sub(1).and_then(|k| ordering(&c.ops[k].op));
                    let after = c.ops.get(i).and_then(|o| ordering(&o.op));
                    match before.or(after) {
                        Some(op) => self.guard(operand, op),
                        None => self.expr(operand),
                    }
                }
            }
            Expr::Test(t) => match ORDERING_TESTS.iter().find(|(name, _)| *name == t.name) {
                // The tested value only: an argument may be written without parentheses
                // (`x is gt 3`), where wrapping it would change how the test parses.
                Some((_, op)) => {
                    self.guard(&t.expr, op);
                    self.args(&t.args);
                }
                None => {
                    self.expr(&t.expr);
                    self.args(&t.args);
                }
            },
            other => {
                for child in children(other) {
                    self.expr(child);
                }
            }
        }
    }
}

fn arg_expr<'x, 'a>(arg: &'x ast::CallArg<'a>) -> &'x ast::Expr<'a> {
    match arg {
        ast::CallArg::Pos(e)
        | ast::CallArg::Kwarg(_, e)
        | ast::CallArg::PosSplat(e)
        | ast::CallArg::KwargSplat(e) => e,
    }
}

/// The expressions directly inside `expr`.
fn children<'x, 'a>(expr: &'x ast::Expr<'a>) -> Vec<&'x ast::Expr<'a>> {
    use ast::Expr;
    let mut out = Vec::new();
    match expr {
        Expr::Var(_) | Expr::Const(_) => {}
        Expr::Slice(s) => {
            out.push(&s.expr);
            out.extend(s.start.iter().chain(&s.stop).chain(&s.step));
        }
        Expr::UnaryOp(u) => out.push(&u.expr),
        Expr::BinOp(b) => out.extend([&b.left, &b.right]),
        Expr::Compare(c) => {
            out.push(&c.expr);
            out.extend(c.ops.iter().map(|o| &o.expr));
        }
        Expr::IfExpr(i) => {
            out.extend([&i.test_expr, &i.true_expr]);
            out.extend(&i.false_expr);
        }
        Expr::Filter(f) => {
            out.extend(&f.expr);
            out.extend(f.args.iter().map(arg_expr));
        }
        Expr::Test(t) => {
            out.push(&t.expr);
            out.extend(t.args.iter().map(arg_expr));
        }
        Expr::GetAttr(g) => out.push(&g.expr),
        Expr::GetItem(g) => out.extend([&g.expr, &g.subscript_expr]),
        Expr::Call(c) => {
            out.push(&c.expr);
            out.extend(c.args.iter().map(arg_expr));
        }
        Expr::List(l) => out.extend(&l.items),
        Expr::Tuple(t) => out.extend(&t.items),
        Expr::Map(m) => out.extend(m.keys.iter().chain(&m.values)),
    }
    out
}

/// The source range from an expression's first token to its last. A node's own span does not
/// always cover its operands (a filter's starts at the filter's name), so it is widened by
/// its children's.
fn extent(expr: &ast::Expr<'_>) -> (u32, u32) {
    use ast::Expr;
    let span = match expr {
        Expr::Var(s) => s.span(),
        Expr::Const(s) => s.span(),
        Expr::Slice(s) => s.span(),
        Expr::UnaryOp(s) => s.span(),
        Expr::BinOp(s) => s.span(),
        Expr::Compare(s) => s.span(),
        Expr::IfExpr(s) => s.span(),
        Expr::Filter(s) => s.span(),
        Expr::Test(s) => s.span(),
        Expr::GetAttr(s) => s.span(),
        Expr::GetItem(s) => s.span(),
        Expr::Call(s) => s.span(),
        Expr::List(s) => s.span(),
        Expr::Tuple(s) => s.span(),
        Expr::Map(s) => s.span(),
    };
    children(expr)
        .into_iter()
        .map(extent)
        .fold((span.start_offset, span.end_offset), |(s, e), (cs, ce)| {
            (s.min(cs), e.max(ce))
        })
}

#[cfg(test)]
mod tests {
    use super::guard;
    use crate::TemplateEngine;
    use minijinja::context;

    #[test]
    fn ordering_an_undefined_value_fails() {
        let engine = TemplateEngine::new();
        let ctx = context! { n => 0, s => "a" };
        let render = |source: &str| engine.render(source, &ctx);
        for source in [
            "{% if missing > 4 %}big{% else %}small{% endif %}",
            "{{ 4 <= missing.deeper }}",
            "{{ n < 1 < missing }}",
            "{{ missing is lessthan 3 }}",
            "{% for i in [1, 2] if i > missing %}{{ i }}{% endfor %}",
        ] {
            let err = render(source).expect_err(source).to_string();
            assert!(err.contains("undefined value compared"), "{source}: {err}");
        }
        for (source, out) in [
            // Chained comparisons stop at the first false one, as in Python.
            ("{{ n > 1 > missing }}", "False"),
            ("{{ missing == 1 }}", "False"),
            ("{{ missing != 1 }}", "True"),
            ("{{ missing | default(0) > 3 }}", "False"),
            ("{{ (missing or 0) <= 3 }}", "True"),
            ("{{ s < 'b' }}", "True"),
            ("{{ [n, 2] | select('>', 1) | list }}", "[2]"),
        ] {
            assert_eq!(render(source).as_deref(), Ok(out), "{source}");
        }
    }

    #[test]
    fn wraps_each_ordering_operand() {
        assert_eq!(
            guard("{% if a.b > 4 %}x{% endif %}"),
            "{% if (a.b)|__spur_ordered('>') > (4)|__spur_ordered('>') %}x{% endif %}"
        );
        assert_eq!(
            guard("{{ x | int <= (y + 1) }}"),
            "{{ (x | int)|__spur_ordered('<=') <= ((y + 1)|__spur_ordered('<=')) }}"
        );
        assert_eq!(
            guard("{{ (a < b) > c }}"),
            "{{ (((a)|__spur_ordered('<') < (b)|__spur_ordered('<'))|__spur_ordered('>')) > (c)|__spur_ordered('>') }}"
        );
        assert_eq!(
            guard("{{ x is gt 3 }}"),
            "{{ (x)|__spur_ordered('>') is gt 3 }}"
        );
    }

    #[test]
    fn leaves_other_templates_alone() {
        for source in [
            "{{ a == b }}",
            "{{ a in b }}",
            "<b>{{ x }}</b>",
            "{{ '<' ~ x ~ '>' }}",
            "{% if x > %}",
        ] {
            assert_eq!(guard(source), source);
        }
    }
}
