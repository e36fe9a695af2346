"""Open untrusted pickles (plain and joblib) through an allowlist of exact model classes.

Defence in depth only: the conversion job that runs this is isolated and assumed hostile anyway.

A pickle names globals (`find_class`) and then calls them. Here a global resolves only if it is on
one of three exact lists, and the unpickler's opcodes are checked too:
- CLASSES: data-holding types (estimators, arrays, dtypes). NEWOBJ may create them without calling
  `__init__`, and BUILD may set the state of their instances. Only the few in CALLED_CLASSES, whose
  constructors merely allocate, may be called by REDUCE (so `Booster(model_file=...)` cannot read a file).
- RECONSTRUCTORS: the functions numpy, scikit-learn and the pickle protocol themselves call to rebuild
  objects, each wrapped to check its arguments (several take a class or a callable).
- STORED_FUNCTIONS: pure functions a model keeps as a parameter (score functions, ufuncs). They may be
  referenced, never called while loading.
Any other global, and REDUCE/NEWOBJ/BUILD on anything not listed, raise RefusedGlobal before it runs.
The lists were recorded from ~180 fitted estimators (every protocol, joblib compressed or not), then reviewed.
"""

from __future__ import annotations

import functools
import importlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

MAX_NAME_IN_MESSAGE = 80

# module -> space-separated class names, exactly as pickles name them.
_CLASS_NAMES: dict[str, str] = {
    "builtins": "object bool int float complex str bytes bytearray tuple list dict set frozenset slice range",
    "collections": "OrderedDict defaultdict deque Counter",
    "functools": "partial",
    "joblib.numpy_pickle": "NumpyArrayWrapper",
    "numpy": "ndarray dtype bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64 "
             "longdouble complex64 complex128 str_ bytes_ object_ void",
    "numpy.random.mtrand": "RandomState",
    "numpy.random._generator": "Generator",
    "numpy.random._mt19937": "MT19937",
    "numpy.random._pcg64": "PCG64 PCG64DXSM",
    "numpy.random._philox": "Philox",
    "numpy.random._sfc64": "SFC64",
    "numpy.random.bit_generator": "SeedSequence",
    "scipy.sparse._csr": "csr_matrix csr_array",
    "scipy.sparse._csc": "csc_matrix csc_array",
    "scipy.sparse._coo": "coo_matrix coo_array",
    "scipy.interpolate._bsplines": "BSpline",
    "xgboost.sklearn": "XGBModel XGBClassifier XGBRegressor XGBRanker XGBRFClassifier XGBRFRegressor",
    "xgboost.core": "Booster",
    "lightgbm.sklearn": "LGBMModel LGBMClassifier LGBMRegressor LGBMRanker",
    "lightgbm.basic": "Booster",
    "sklearn._loss._loss": "CyAbsoluteError CyExponentialLoss CyHalfBinomialLoss CyHalfGammaLoss "
                           "CyHalfMultinomialLoss CyHalfPoissonLoss CyHalfSquaredError CyHalfTweedieLoss "
                           "CyHalfTweedieLossIdentity CyHuberLoss CyPinballLoss",
    "sklearn._loss.link": "HalfLogitLink IdentityLink Interval LogLink LogitLink MultinomialLogit",
    "sklearn._loss.loss": "AbsoluteError ExponentialLoss HalfBinomialLoss HalfGammaLoss HalfMultinomialLoss "
                          "HalfPoissonLoss HalfSquaredError HalfTweedieLoss HalfTweedieLossIdentity HuberLoss "
                          "PinballLoss",
    "sklearn.calibration": "CalibratedClassifierCV _CalibratedClassifier _SigmoidCalibration",
    "sklearn.cluster._birch": "Birch _CFNode _CFSubcluster",
    "sklearn.cluster._bisect_k_means": "BisectingKMeans _BisectingTree",
    "sklearn.cluster._kmeans": "KMeans MiniBatchKMeans",
    "sklearn.compose._column_transformer": "ColumnTransformer",
    "sklearn.compose._target": "TransformedTargetRegressor",
    "sklearn.cross_decomposition._pls": "CCA PLSCanonical PLSRegression",
    "sklearn.decomposition._dict_learning": "DictionaryLearning",
    "sklearn.decomposition._factor_analysis": "FactorAnalysis",
    "sklearn.decomposition._fastica": "FastICA",
    "sklearn.decomposition._incremental_pca": "IncrementalPCA",
    "sklearn.decomposition._kernel_pca": "KernelPCA",
    "sklearn.decomposition._lda": "LatentDirichletAllocation",
    "sklearn.decomposition._nmf": "NMF",
    "sklearn.decomposition._pca": "PCA",
    "sklearn.decomposition._sparse_pca": "MiniBatchSparsePCA SparsePCA",
    "sklearn.decomposition._truncated_svd": "TruncatedSVD",
    "sklearn.discriminant_analysis": "LinearDiscriminantAnalysis QuadraticDiscriminantAnalysis",
    "sklearn.dummy": "DummyClassifier DummyRegressor",
    "sklearn.ensemble._bagging": "BaggingClassifier BaggingRegressor",
    "sklearn.ensemble._forest": "ExtraTreesClassifier ExtraTreesRegressor RandomForestClassifier "
                                "RandomForestRegressor",
    "sklearn.ensemble._gb": "GradientBoostingClassifier GradientBoostingRegressor",
    "sklearn.ensemble._hist_gradient_boosting.binning": "_BinMapper",
    "sklearn.ensemble._hist_gradient_boosting.gradient_boosting": "HistGradientBoostingClassifier "
                                                                  "HistGradientBoostingRegressor",
    "sklearn.ensemble._hist_gradient_boosting.predictor": "TreePredictor",
    "sklearn.ensemble._iforest": "IsolationForest",
    "sklearn.ensemble._stacking": "StackingClassifier StackingRegressor",
    "sklearn.ensemble._voting": "VotingClassifier VotingRegressor",
    "sklearn.ensemble._weight_boosting": "AdaBoostClassifier AdaBoostRegressor",
    "sklearn.feature_extraction.text": "CountVectorizer TfidfTransformer TfidfVectorizer",
    "sklearn.feature_selection._from_model": "SelectFromModel",
    "sklearn.feature_selection._rfe": "RFE RFECV",
    "sklearn.feature_selection._univariate_selection": "GenericUnivariateSelect SelectFdr SelectFpr SelectFwe "
                                                       "SelectKBest SelectPercentile",
    "sklearn.feature_selection._variance_threshold": "VarianceThreshold",
    "sklearn.gaussian_process._gpc": "GaussianProcessClassifier _BinaryGaussianProcessClassifierLaplace",
    "sklearn.gaussian_process._gpr": "GaussianProcessRegressor",
    "sklearn.gaussian_process.kernels": "CompoundKernel ConstantKernel DotProduct ExpSineSquared Exponentiation "
                                        "Matern PairwiseKernel Product RBF RationalQuadratic Sum WhiteKernel",
    "sklearn.impute._base": "MissingIndicator SimpleImputer",
    "sklearn.impute._knn": "KNNImputer",
    "sklearn.isotonic": "IsotonicRegression",
    "sklearn.kernel_approximation": "Nystroem RBFSampler",
    "sklearn.kernel_ridge": "KernelRidge",
    "sklearn.linear_model._base": "LinearRegression",
    "sklearn.linear_model._bayes": "ARDRegression BayesianRidge",
    "sklearn.linear_model._coordinate_descent": "ElasticNet ElasticNetCV Lasso LassoCV",
    "sklearn.linear_model._glm.glm": "GammaRegressor PoissonRegressor TweedieRegressor",
    "sklearn.linear_model._huber": "HuberRegressor",
    "sklearn.linear_model._least_angle": "Lars LarsCV LassoLars LassoLarsCV LassoLarsIC",
    "sklearn.linear_model._logistic": "LogisticRegression LogisticRegressionCV",
    "sklearn.linear_model._omp": "OrthogonalMatchingPursuit OrthogonalMatchingPursuitCV",
    "sklearn.linear_model._passive_aggressive": "PassiveAggressiveClassifier PassiveAggressiveRegressor",
    "sklearn.linear_model._perceptron": "Perceptron",
    "sklearn.linear_model._quantile": "QuantileRegressor",
    "sklearn.linear_model._ransac": "RANSACRegressor",
    "sklearn.linear_model._ridge": "Ridge RidgeCV RidgeClassifier RidgeClassifierCV",
    "sklearn.linear_model._sgd_fast": "EpsilonInsensitive Hinge ModifiedHuber SquaredEpsilonInsensitive "
                                      "SquaredHinge",
    "sklearn.linear_model._stochastic_gradient": "SGDClassifier SGDOneClassSVM SGDRegressor",
    "sklearn.linear_model._theil_sen": "TheilSenRegressor",
    "sklearn.metrics._dist_metrics": "ChebyshevDistance64 EuclideanDistance64 ManhattanDistance64 "
                                     "MinkowskiDistance64",
    "sklearn.mixture._bayesian_mixture": "BayesianGaussianMixture",
    "sklearn.mixture._gaussian_mixture": "GaussianMixture",
    "sklearn.multiclass": "OneVsOneClassifier OneVsRestClassifier OutputCodeClassifier _ConstantPredictor",
    "sklearn.multioutput": "ClassifierChain MultiOutputClassifier MultiOutputRegressor RegressorChain",
    "sklearn.naive_bayes": "BernoulliNB CategoricalNB ComplementNB GaussianNB MultinomialNB",
    "sklearn.neighbors._ball_tree": "BallTree",
    "sklearn.neighbors._classification": "KNeighborsClassifier RadiusNeighborsClassifier",
    "sklearn.neighbors._graph": "KNeighborsTransformer",
    "sklearn.neighbors._kd_tree": "KDTree",
    "sklearn.neighbors._kde": "KernelDensity",
    "sklearn.neighbors._lof": "LocalOutlierFactor",
    "sklearn.neighbors._nearest_centroid": "NearestCentroid",
    "sklearn.neighbors._regression": "KNeighborsRegressor RadiusNeighborsRegressor",
    "sklearn.neighbors._unsupervised": "NearestNeighbors",
    "sklearn.neural_network._multilayer_perceptron": "MLPClassifier MLPRegressor",
    "sklearn.neural_network._rbm": "BernoulliRBM",
    "sklearn.neural_network._stochastic_optimizers": "AdamOptimizer SGDOptimizer",
    "sklearn.pipeline": "FeatureUnion Pipeline",
    "sklearn.preprocessing._data": "Binarizer KernelCenterer MaxAbsScaler MinMaxScaler Normalizer PowerTransformer "
                                   "QuantileTransformer RobustScaler StandardScaler",
    "sklearn.preprocessing._discretization": "KBinsDiscretizer",
    "sklearn.preprocessing._encoders": "OneHotEncoder OrdinalEncoder",
    "sklearn.preprocessing._function_transformer": "FunctionTransformer",
    "sklearn.preprocessing._label": "LabelBinarizer LabelEncoder",
    "sklearn.preprocessing._polynomial": "PolynomialFeatures SplineTransformer",
    "sklearn.preprocessing._target_encoder": "TargetEncoder",
    "sklearn.random_projection": "GaussianRandomProjection SparseRandomProjection",
    "sklearn.svm._classes": "LinearSVC LinearSVR NuSVC NuSVR OneClassSVM SVC SVR",
    "sklearn.tree._classes": "DecisionTreeClassifier DecisionTreeRegressor ExtraTreeClassifier ExtraTreeRegressor",
    "sklearn.tree._tree": "Tree",
    "sklearn.utils._bunch": "Bunch",
}

# Classes a pickle calls (REDUCE) rather than creates with NEWOBJ; their constructors only allocate.
_CALLED_CLASS_NAMES = {
    "builtins": "object bool int float complex str bytes bytearray tuple list dict set frozenset slice range",
    "collections": "OrderedDict defaultdict deque Counter",
    "functools": "partial",
    "numpy": "dtype",
    "sklearn._loss._loss": _CLASS_NAMES["sklearn._loss._loss"],
    "sklearn.linear_model._sgd_fast": _CLASS_NAMES["sklearn.linear_model._sgd_fast"],
    "sklearn.tree._tree": "Tree",
}

# Pure functions models store as parameters: referenced by a pickle, never called while loading.
_STORED_FUNCTION_NAMES = {
    "numpy": "abs absolute exp exp2 expm1 log log10 log1p log2 sqrt square cbrt reciprocal negative sign "
             "sin cos tan tanh sinh cosh arcsinh arctan floor ceil rint",
    "scipy.special._ufuncs": "logit",
    "scipy.special._special_ufuncs": "expit logit",
    "scipy._lib.array_api_compat.numpy._aliases": "asarray",  # scipy's BSpline keeps its array namespace
    "sklearn.feature_selection._univariate_selection": "chi2 f_classif f_oneway f_regression r_regression",
    "sklearn.feature_selection._mutual_info": "mutual_info_classif mutual_info_regression",
    "sklearn.utils.validation": "check_array",  # HistGradientBoosting keeps partial(check_array, dtype=...)
    "sklearn.cluster._kmeans": "_kmeans_single_elkan _kmeans_single_lloyd",  # BisectingKMeans' chosen algorithm
}

# Protocol 0-2 pickles written by Python 2 name these modules; numpy 1.x pickles name numpy.core.
MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for, or tried to call, something that is not on the allowlist."""

    def __init__(self, module: str, name: str, why: str) -> None:
        self.global_name = f"{_short(module)}.{_short(name)}"
        super().__init__(f"refused to unpickle {self.global_name}: {why}")


def _short(text: str) -> str:
    text = "".join(c if c.isprintable() else "?" for c in str(text)[:MAX_NAME_IN_MESSAGE])
    return text if len(text) < MAX_NAME_IN_MESSAGE else text + "…"


def _qualified(obj: Any) -> tuple[str, str]:
    return str(getattr(obj, "__module__", "?")), str(getattr(obj, "__qualname__", type(obj).__name__))


def _resolve(module: str, name: str) -> Any:
    # Read the module's own namespace: a module-level __getattr__ could import something first.
    obj = vars(importlib.import_module(module)).get(name)
    if obj is None:
        raise RefusedGlobal(module, name, "no such name in that module")
    return obj


def _names(table: dict[str, str]) -> frozenset[tuple[str, str]]:
    return frozenset((module, name) for module, names in table.items() for name in names.split())


CLASS_NAMES = _names(_CLASS_NAMES)
CALLED_CLASS_NAMES = _names(_CALLED_CLASS_NAMES)
STORED_FUNCTION_NAMES = _names(_STORED_FUNCTION_NAMES)


@functools.cache
def _classes() -> frozenset[Any]:
    return frozenset(_resolve(m, n) for m, n in CLASS_NAMES if _importable(m))


@functools.cache
def _called_classes() -> frozenset[Any]:
    return frozenset(_resolve(m, n) for m, n in CALLED_CLASS_NAMES)


@functools.cache
def _partial_targets() -> frozenset[Any]:
    return frozenset(_resolve(m, n) for m, n in STORED_FUNCTION_NAMES if _importable(m))


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _member(obj: Any, allowed: frozenset[Any]) -> bool:
    try:
        return obj in allowed
    except TypeError:  # unhashable, so not a listed class or function
        return False


def _refuse_call(obj: Any, why: str) -> RefusedGlobal:
    module, name = _qualified(obj)
    return RefusedGlobal(module, name, why)


def _require_class(cls: Any, role: str) -> None:
    if not isinstance(cls, type) or not _member(cls, _classes()):
        raise _refuse_call(cls, f"{role} must be an allowlisted model class")


# ---- reconstructors: each is what a real pickle calls, with its arguments checked ----

def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Protocol 0/1 objects: copyreg builds `cls` from `base` (object or a builtin it subclasses)."""
    import copyreg

    _require_class(cls, "copyreg._reconstructor's class")
    _require_class(base, "copyreg._reconstructor's base")
    return copyreg._reconstructor(cls, base, state)  # type: ignore[attr-defined]


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """Protocol 2 writes bytes as _codecs.encode(str, 'latin1')."""
    import _codecs

    if not isinstance(text, str) or encoding != "latin1":
        raise RefusedGlobal("_codecs", "encode", "only encode(str, 'latin1') rebuilds bytes")
    return _codecs.encode(text, encoding)


def _array_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    """Every pickled ndarray: numpy's _reconstruct(ndarray, shape, dtype), then BUILD sets its data."""
    import numpy as np
    from numpy._core.multiarray import _reconstruct

    if subtype is not np.ndarray:
        raise _refuse_call(subtype, "only plain numpy arrays are rebuilt")
    return _reconstruct(subtype, shape, dtype)


def _numpy_scalar(dtype: Any, *data: Any) -> Any:
    """numpy scalars (np.float64(1.0)): bytes of one value and its dtype."""
    import numpy as np
    from numpy._core.multiarray import scalar

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise RefusedGlobal("numpy._core.multiarray", "scalar", "only scalars of numeric dtypes are rebuilt")
    return scalar(dtype, *data)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> Any:
    """Protocol 5 arrays: numpy's _frombuffer over out-of-band or in-band bytes."""
    import numpy as np
    from numpy._core.numeric import _frombuffer

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise RefusedGlobal("numpy._core.numeric", "_frombuffer", "only numeric arrays come from a buffer")
    return _frombuffer(buf, dtype, shape, order)


def _bit_generator_ctor(name: Any = "MT19937") -> Any:
    """Random generators (random_state=np.random.RandomState(0)): a bit generator by name or class."""
    from numpy.random import _pickle

    known = _pickle.BitGenerators
    if isinstance(name, str) and name in known:
        return known[name]()
    if any(name is cls for cls in known.values()):
        return name()
    raise RefusedGlobal("numpy.random._pickle", "__bit_generator_ctor", "unknown bit generator")


def _bit_generator(name: Any, ctor: Any) -> Any:
    from numpy.random import _pickle

    if not any(ctor is c for c in (None, _bit_generator_ctor, vars(_pickle)["__bit_generator_ctor"])):
        raise _refuse_call(ctor, "a random state is built from a named bit generator only")
    if any(type(name) is cls for cls in _pickle.BitGenerators.values()):
        return name
    return _bit_generator_ctor(name)


def _randomstate_ctor(name: Any = "MT19937", ctor: Any = None) -> Any:
    """np.random.RandomState; the stored constructor callable is not called, the name is looked up."""
    from numpy.random import RandomState

    return RandomState(_bit_generator(name, ctor))


def _generator_ctor(name: Any = "MT19937", ctor: Any = None) -> Any:
    """np.random.Generator (HistGradientBoosting keeps one): as for RandomState."""
    from numpy.random import Generator

    return Generator(_bit_generator(name, ctor))


def _seed_sequence(cls: Any, checksum: Any, state: Any) -> Any:
    """Cython's pickle helper for numpy's SeedSequence."""
    from numpy.random.bit_generator import SeedSequence

    if cls is not SeedSequence:
        raise _refuse_call(cls, "only a SeedSequence is rebuilt here")
    return vars(importlib.import_module("numpy.random.bit_generator"))["__pyx_unpickle_SeedSequence"](
        cls, checksum, state)


def _sklearn_new_object(cls: Any) -> Any:
    """scikit-learn's Cython trees and distance metrics pickle as newObj(cls) == cls.__new__(cls)."""
    _require_class(cls, "newObj's class")
    return cls.__new__(cls)


_RECONSTRUCTORS: dict[tuple[str, str], Callable[..., Any]] = {
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy._core.multiarray", "_reconstruct"): _array_reconstruct,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy.random._pickle", "__bit_generator_ctor"): _bit_generator_ctor,
    ("numpy.random._pickle", "__randomstate_ctor"): _randomstate_ctor,
    ("numpy.random._pickle", "__generator_ctor"): _generator_ctor,
    ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"): _seed_sequence,
    ("sklearn.metrics._dist_metrics", "newObj"): _sklearn_new_object,
    ("sklearn.neighbors._kd_tree", "newObj"): _sklearn_new_object,
    ("sklearn.neighbors._ball_tree", "newObj"): _sklearn_new_object,
}
RECONSTRUCTOR_NAMES = frozenset(_RECONSTRUCTORS)
_CALLABLE_RECONSTRUCTORS = frozenset(_RECONSTRUCTORS.values())


def find_allowed_class(module: str, name: str) -> Any:
    """Resolve `module.name` for an unpickler, or raise RefusedGlobal before importing anything unlisted."""
    module = MODULE_ALIASES.get(module, module)
    if module == "numpy.core" or module.startswith("numpy.core."):
        # numpy 1.x pickles name numpy.core, a forwarding shim over numpy._core in numpy 2.
        module = "numpy._core" + module[len("numpy.core"):]
    key = (module, name)
    if key in _RECONSTRUCTORS:
        return _RECONSTRUCTORS[key]
    if key in CLASS_NAMES or key in STORED_FUNCTION_NAMES:
        return _resolve(module, name)
    raise RefusedGlobal(module, name, "not an allowlisted model class or reconstructor")


# ---- the opcodes that call or mutate: checked before the base unpickler runs them ----

def _check_call(func: Any, args: Any) -> None:
    """REDUCE, INST and OBJ call `func(*args)`: only reconstructors and the classes that merely allocate."""
    if _member(func, _CALLABLE_RECONSTRUCTORS):
        return
    if not isinstance(func, type) or not _member(func, _called_classes()):
        raise _refuse_call(func, "calling it while unpickling is not allowed")
    if func is functools.partial and (not args or not _member(args[0], _partial_targets())):
        raise _refuse_call(args[0] if args else func, "a partial may only wrap an allowlisted pure function")
    if func.__name__ == "defaultdict" and args and args[0] is not None and not _member(args[0], _classes()):
        raise _refuse_call(args[0], "a defaultdict's factory must be an allowlisted class")


def _check_new(cls: Any, args: Any) -> None:
    """NEWOBJ runs `cls.__new__(cls, *args)` without `__init__`."""
    _require_class(cls, "NEWOBJ's class")
    if cls is functools.partial and (not args or not _member(args[0], _partial_targets())):
        raise _refuse_call(cls, "a partial may only wrap an allowlisted pure function")


def _check_build(inst: Any, state: Any) -> None:
    """BUILD runs `inst.__setstate__(state)` or sets attributes: only on instances of listed classes."""
    import numpy as np

    if isinstance(inst, type) or not (_member(type(inst), _classes()) or isinstance(inst, np.dtype)):
        raise _refuse_call(type(inst), "setting state on it is not allowed")
    if isinstance(inst, functools.partial):
        func = state[0] if isinstance(state, tuple) and state else None
        if not _member(func, _partial_targets()):
            raise _refuse_call(func, "a partial may only wrap an allowlisted pure function")


def _checked_dispatch(base: type[pickle._Unpickler]) -> dict[int, Callable[[Any], None]]:  # type: ignore[name-defined]
    dispatch = dict(base.dispatch)
    parent = base.dispatch

    def reduce(self: Any) -> None:
        _check_call(self.stack[-2], self.stack[-1])
        parent[pickle.REDUCE[0]](self)

    def newobj(self: Any) -> None:
        _check_new(self.stack[-2], self.stack[-1])
        parent[pickle.NEWOBJ[0]](self)

    def newobj_ex(self: Any) -> None:
        if self.stack[-1]:
            raise _refuse_call(self.stack[-3], "NEWOBJ_EX with keyword arguments is not allowed")
        _check_new(self.stack[-3], self.stack[-2])
        parent[pickle.NEWOBJ_EX[0]](self)

    def build(self: Any) -> None:
        _check_build(self.stack[-2], self.stack[-1])
        parent[pickle.BUILD[0]](self)

    def refuse_instantiate(self: Any) -> None:
        # INST and OBJ (protocols 0 and 1) call a class with arguments; pickles of models never use them.
        raise pickle.UnpicklingError("refused to unpickle: the INST/OBJ opcodes of protocol 0/1 are not allowed")

    dispatch[pickle.REDUCE[0]] = reduce
    dispatch[pickle.NEWOBJ[0]] = newobj
    dispatch[pickle.NEWOBJ_EX[0]] = newobj_ex
    dispatch[pickle.BUILD[0]] = build
    dispatch[pickle.INST[0]] = refuse_instantiate
    dispatch[pickle.OBJ[0]] = refuse_instantiate
    return dispatch


_CHECKED_DISPATCH = _checked_dispatch(pickle._Unpickler)  # type: ignore[attr-defined]


class AllowlistUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """The pure-Python unpickler (its opcodes can be checked) resolving globals only via `find_allowed_class`."""

    dispatch = _CHECKED_DISPATCH

    def find_class(self, module: str, name: str) -> Any:
        return find_allowed_class(module, name)


def load(stream: BinaryIO) -> Any:
    """Unpickle one object from a binary stream through the allowlist."""
    return AllowlistUnpickler(stream).load()


def load_joblib(path: str | Path) -> Any:
    """Load a joblib.dump file (compressed or not) through the allowlist, arrays included."""
    from joblib.numpy_pickle import NumpyArrayWrapper, NumpyUnpickler
    from joblib.numpy_pickle_utils import _validate_fileobject_and_memmap

    class AllowlistNumpyUnpickler(NumpyUnpickler):  # type: ignore[misc]
        def find_class(self, module: str, name: str) -> Any:
            return find_allowed_class(module, name)

        def load_build(self) -> None:
            _CHECKED_DISPATCH[pickle.BUILD[0]](self)
            wrapper = self.stack[-1]
            if isinstance(wrapper, NumpyArrayWrapper):
                self.stack.pop()
                # joblib reads an object array's nested pickle with a plain unpickler; read it with ours.
                if wrapper.dtype.hasobject:
                    self.stack.append(AllowlistUnpickler(self.file_handle).load())
                else:
                    self.stack.append(wrapper.read_array(self, self.ensure_native_byte_order))

        dispatch = {**_CHECKED_DISPATCH, pickle.BUILD[0]: load_build}

    with open(path, "rb") as f, _validate_fileobject_and_memmap(f, str(path)) as (fobj, _):
        if isinstance(fobj, str):
            raise pickle.UnpicklingError("written by joblib older than 0.10 (arrays in side files); re-save it")
        return AllowlistNumpyUnpickler(str(path), fobj, ensure_native_byte_order=True).load()


# ---- skops: the same exact lists, checked on the file's schema before skops builds anything ----

MAX_SKOPS_SCHEMA_BYTES = 64 * 1024 * 1024
# skops node kinds that only hold data or name a listed type; MethodNode and OperatorFuncNode (bound methods,
# operator.attrgetter/methodcaller) are call gadgets and are never trusted.
SKOPS_DATA_LOADERS = frozenset({
    "DictNode", "ListNode", "TupleNode", "SetNode", "JsonNode", "BytesNode", "BytearrayNode", "SliceNode",
    "DefaultDictNode", "FunctionNode", "TypeNode", "ObjectNode", "PartialNode", "DTypeNode", "NdArrayNode",
    "RandomStateNode", "RandomGeneratorNode", "SparseMatrixNode", "_DictWithDeprecatedKeysNode",
})
# Node kinds that call their type with arguments from the file: only the classes pickles may call.
SKOPS_CALLING_LOADERS = frozenset({"ReduceNode", "TreeNode", "LossNode", "ConstructorFromReduceNode"})


def skops_types(schema: Any) -> set[tuple[str, str, str]]:
    """Every (module, name, loader) a skops schema asks for, however deeply nested."""
    found: set[tuple[str, str, str]] = set()
    pending = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if "__class__" in node or "__module__" in node:
                found.add((str(node.get("__module__")), str(node.get("__class__")), str(node.get("__loader__"))))
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return found


def _check_skops_type(module: str, name: str, loader: str) -> None:
    key = (MODULE_ALIASES.get(module, module), name)
    if loader in SKOPS_CALLING_LOADERS:
        if key not in CALLED_CLASS_NAMES:
            raise RefusedGlobal(module, name, f"skops would call it ({_short(loader)}); not an allocating class")
    elif loader not in SKOPS_DATA_LOADERS:
        raise RefusedGlobal(module, name, f"the skops node kind {_short(loader)} is not allowed")
    elif key not in CLASS_NAMES and key not in STORED_FUNCTION_NAMES:
        raise RefusedGlobal(module, name, "not an allowlisted model class or function")


def load_skops(path: str | Path) -> Any:
    """Load a .skops file whose every type, function and node kind is on the exact lists above."""
    import json
    import zipfile

    import skops.io

    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("schema.json")
        if info.file_size > MAX_SKOPS_SCHEMA_BYTES:
            raise ValueError(f"the skops schema is {info.file_size} bytes, over the {MAX_SKOPS_SCHEMA_BYTES} limit")
        schema = json.loads(archive.read(info))
    found = skops_types(schema)
    for module, name, loader in sorted(found):
        _check_skops_type(module, name, loader)
    return skops.io.load(path, trusted=sorted({f"{m}.{n}" for m, n, _ in found}))
