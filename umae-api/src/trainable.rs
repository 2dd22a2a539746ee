//! An object-safe view of a trainable burn module.
//!
//! burn modules are generic over the backend and their mapping API is generic over tensor rank,
//! so a module cannot be handed to an optimizer through a trait object directly. [`Trainable`]
//! exposes every float parameter as a flat rank-1 tensor with its dotted path and shape; the
//! blanket impl for all `AutodiffModule<B>` reshapes back. The runtime's optimizer, checkpoints
//! and analyses work on any plugin through this trait alone.

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use crate::B;

/// The backend without autodiff, where optimizer arithmetic happens.
pub type Inner = <B as AutodiffBackend>::InnerBackend;
/// Gradients returned by `loss.backward()`.
pub type Grads = <B as AutodiffBackend>::Gradients;

/// A parameter's identity: its dotted path inside the module and its shape.
#[derive(Debug, Clone, Copy)]
pub struct ParamInfo<'a> {
    pub path: &'a str,
    pub shape: &'a [usize],
}

impl ParamInfo<'_> {
    /// Whether weight decay applies: matrices and kernels (rank >= 2) decay; biases, norm
    /// scales and learned tokens (stored as rank-1 by convention) do not, as in MAE.
    pub fn decays(&self) -> bool {
        self.shape.len() >= 2
    }
}

pub trait Trainable: Send {
    /// Trainable scalar count.
    fn num_params(&self) -> usize;
    /// Every float parameter, flattened.
    fn visit_params(&self, f: &mut dyn FnMut(&ParamInfo, Tensor<Inner, 1>));
    /// The gradient of every float parameter that has one, flattened.
    fn visit_grads(&self, grads: &Grads, f: &mut dyn FnMut(&ParamInfo, Tensor<Inner, 1>));
    /// Replace every float parameter by `f(info, value)` (same number of elements).
    fn map_params(&mut self, f: &mut dyn FnMut(&ParamInfo, Tensor<Inner, 1>) -> Tensor<Inner, 1>);
    /// Track gradients of every parameter (`true`, the default after building) or of none
    /// (`false`: forward passes then build no autodiff graph, as frozen-feature evaluation
    /// needs; without it each pass's graph is kept alive).
    fn set_trainable(&mut self, on: bool);
}

#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn joined(&self) -> String {
        self.0.join(".")
    }
}

struct Visit<'a> {
    path: Path,
    grads: Option<&'a Grads>,
    f: &'a mut dyn FnMut(&ParamInfo, Tensor<Inner, 1>),
}

impl ModuleVisitor<B> for Visit<'_> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        let shape = value.dims().to_vec();
        let n: usize = shape.iter().product();
        let flat = match self.grads {
            None => Some(value.inner()),
            Some(g) => value.grad(g),
        };
        if let Some(t) = flat {
            let path = self.path.joined();
            (self.f)(
                &ParamInfo {
                    path: &path,
                    shape: &shape,
                },
                t.reshape([n]),
            );
        }
    }
}

struct Map<'a> {
    path: Path,
    f: &'a mut dyn FnMut(&ParamInfo, Tensor<Inner, 1>) -> Tensor<Inner, 1>,
}

impl ModuleMapper<B> for Map<'_> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, value, mapper) = param.consume();
        let dims = value.dims();
        let shape = dims.to_vec();
        let n: usize = shape.iter().product();
        let requires = value.is_require_grad();
        let path = self.path.joined();
        let new = (self.f)(
            &ParamInfo {
                path: &path,
                shape: &shape,
            },
            value.inner().reshape([n]),
        );
        let new = Tensor::<B, D>::from_inner(new.reshape(dims)).set_require_grad(requires);
        Param::from_mapped_value(id, new, mapper)
    }
}

struct RequireGrad(bool);

impl ModuleMapper<B> for RequireGrad {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, value, mapper) = param.consume();
        Param::from_mapped_value(id, value.set_require_grad(self.0), mapper)
    }
}

impl<M: AutodiffModule<B> + 'static> Trainable for M {
    fn set_trainable(&mut self, on: bool) {
        *self = burn::module::Module::map(self.clone(), &mut RequireGrad(on));
    }

    fn num_params(&self) -> usize {
        burn::module::Module::num_params(self)
    }

    fn visit_params(&self, f: &mut dyn FnMut(&ParamInfo, Tensor<Inner, 1>)) {
        let mut v = Visit {
            path: Path::default(),
            grads: None,
            f,
        };
        burn::module::Module::visit(self, &mut v);
    }

    fn visit_grads(&self, grads: &Grads, f: &mut dyn FnMut(&ParamInfo, Tensor<Inner, 1>)) {
        let mut v = Visit {
            path: Path::default(),
            grads: Some(grads),
            f,
        };
        burn::module::Module::visit(self, &mut v);
    }

    fn map_params(&mut self, f: &mut dyn FnMut(&ParamInfo, Tensor<Inner, 1>) -> Tensor<Inner, 1>) {
        let mut m = Map {
            path: Path::default(),
            f,
        };
        *self = burn::module::Module::map(self.clone(), &mut m);
    }
}
