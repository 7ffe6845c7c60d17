//! CEL expressions over a JSON body (`fail_if_body_json_matches_cel`,
//! `fail_if_body_json_not_matches_cel`), as blackbox_exporter binds them: the body
//! parsed as JSON is the one variable, `body`.

use super::ModuleError;

/// Compiles the expression of `option`; one that does not parse is a config error.
/// (A variable other than `body` fails at evaluation, where cel-go refuses it at load.)
pub fn compile_cel(option: &str, expression: &str) -> Result<::cel::Program, ModuleError> {
    let program = ::cel::Program::compile(expression).map_err(|e| ModuleError::Option {
        option: option.to_string(),
        problem: format!("the CEL expression {expression:?} does not compile: {e}"),
    })?;
    Ok(program)
}
