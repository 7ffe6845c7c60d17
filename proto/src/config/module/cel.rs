//! CEL expressions over a JSON body (`fail_if_body_json_matches_cel`,
//! `fail_if_body_json_not_matches_cel`), as blackbox_exporter binds them: the body
//! parsed as JSON is the one variable, `body`.

use super::ModuleError;

/// Compiles the expression of `option`; one that does not parse, or names a variable
/// other than `body`, is a config error (cel-go refuses both when compiling).
pub fn compile_cel(option: &str, expression: &str) -> Result<::cel::Program, ModuleError> {
    let program = ::cel::Program::compile(expression).map_err(|e| ModuleError::Option {
        option: option.to_string(),
        problem: format!("the CEL expression {expression:?} does not compile: {e}"),
    })?;
    let references = program.references();
    if let Some(other) = references
        .variables()
        .into_iter()
        .find(|name| *name != "body")
    {
        return Err(ModuleError::Option {
            option: option.to_string(),
            problem: format!(
                "the CEL expression {expression:?} names {other:?}: the only variable is `body`, the response body parsed as JSON"
            ),
        });
    }
    Ok(program)
}
